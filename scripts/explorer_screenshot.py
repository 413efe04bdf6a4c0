"""Take the README's screenshot of the attention explorer: figures/explorer.png.

    .venv/bin/python scripts/explorer_screenshot.py      # or: make explorer-figure

Exports the explorer for the coreference sentence of notebook 08 (MiniLM, layer 3 head 1, the
query "it" pinned, the key "animal" hovered), opens the page in headless Chromium (Debian's
chromium and chromium-driver, as in the browser tests) and saves a screenshot of the explorer.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser set-up shared with the tests

from browser import MISSING, chromium  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from attention_ref.show_heads import show_heads_html  # noqa: E402

SENTENCE = "The animal didn't cross the street because it was too tired."


def main(output: Path = ROOT / "figures" / "explorer.png") -> int:
    if MISSING:
        print(MISSING, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, chromium(width=900, height=800) as driver:
        page = Path(tmp) / "explorer.html"
        tokens = ["[CLS]", "the", "animal", "didn", "'", "t", "cross", "the", "street", "because",
                  "it", "was", "too", "tired", ".", "[SEP]"]
        show_heads_html(SENTENCE, page, layer=3, head=1, selected=tokens.index("it"))
        driver.get(page.as_uri())
        root = driver.find_element(By.CSS_SELECTOR, ".ar-explorer")
        assert root.get_attribute("data-tokens") == str(len(tokens)), "MiniLM tokenised differently"
        key = root.find_element(By.CSS_SELECTOR, f".ar-token.ar-k[data-index='{tokens.index('animal')}']")
        ActionChains(driver).move_to_element(key).perform()
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(root.screenshot_as_png)
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
