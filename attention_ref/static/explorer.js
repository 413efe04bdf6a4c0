// attention_ref · attention explorer.
//
// One plain ES module (no imports, no build step, no network) used two ways:
//   * as an anywidget front end: Jupyter loads it from the widget's `_esm` trait and calls
//     `render({ model, el })` with the widget's synced model;
//   * inline in the self-contained HTML page that `export_html` writes, where a few lines of
//     script stand in for anywidget's model (get / set / on / off / save_changes).
//
// Model keys (the widget's traits): tokens (N strings), weights (float32 little-endian bytes of
// P with shape [layers, H, N, N], rows = queries), shape, layer, head, view ("head" | "average" |
// "grid"), direction ("query": pick a query, see its keys; "key": pick a key, see its queries),
// hide_sinks, sinks (token indices), selected (pinned token, -1 for none), title, layer_names,
// head_names.

const SVG_NS = "http://www.w3.org/2000/svg";
const KEYS = ["tokens", "weights", "shape", "layer", "head", "view", "direction", "hide_sinks",
  "sinks", "selected", "title", "layer_names", "head_names"];

// Sequential scale from white to dark blue (ColorBrewer "Blues"). Colour encodes √p, so that the
// many small weights of a row stay visible next to a sink holding most of it; line widths and
// every number shown stay linear in p, and the colour bar is labelled in p.
const BLUES = [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
  [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]];

export function colour(p) {
  const t = Math.sqrt(Math.min(Math.max(p, 0), 1)) * (BLUES.length - 1);
  const i = Math.min(Math.floor(t), BLUES.length - 2);
  const f = t - i;
  const c = BLUES[i].map((a, k) => Math.round(a + f * (BLUES[i + 1][k] - a)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

// anywidget hands a Bytes trait over as a DataView; the HTML page builds one from base64.
export function toFloat32(buffer) {
  if (Array.isArray(buffer)) return Float32Array.from(buffer);
  const view = buffer instanceof DataView ? buffer
    : buffer instanceof ArrayBuffer ? new DataView(buffer)
      : new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  const out = new Float32Array(view.byteLength / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

// The N × N matrix on screen and the tokens it keeps. With sinks hidden, sink rows and columns
// are dropped and each remaining row is divided by its weight on the kept keys (1 − its weight
// on the sinks), so it sums to 1 again; `raw` keeps the true p_ij for the readout.
export function viewMatrix(P, shape, layer, head, hideSinks, sinks) {
  const [, H, N] = shape;
  const at = (h, i, j) => P[((layer * H + h) * N + i) * N + j];
  const heads = head < 0 ? [...Array(H).keys()] : [head];
  const hidden = new Set(hideSinks ? sinks : []);
  const keep = [...Array(N).keys()].filter((i) => !hidden.has(i));
  const raw = keep.map((i) => keep.map((j) => heads.reduce((s, h) => s + at(h, i, j), 0) / heads.length));
  const shown = raw.map((row) => {
    if (!hidden.size) return row;
    const total = row.reduce((s, p) => s + p, 0);
    return row.map((p) => (total > 0 ? p / total : 0));
  });
  return { keep, raw, shown };
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function shortLabel(token, max = 14) {
  return token.length > max ? token.slice(0, max - 1) + "…" : token;
}

function fmt(p, digits = 4) {
  return p.toFixed(digits);
}

function render({ model, el: host }) {
  const root = el("div", { class: "ar-explorer" });
  host.appendChild(root);
  const local = { hover: null };  // {side: "q" | "k", index} of the token under the mouse
  let P = null;
  let weightsSource = null;

  const get = (key) => model.get(key);
  const set = (key, value) => { model.set(key, value); model.save_changes(); };

  function weights() {
    const source = get("weights");
    if (source !== weightsSource) { P = toFloat32(source); weightsSource = source; }
    return P;
  }

  const shape = () => get("shape");
  const names = (key, prefix, n) => {
    const given = get(key) || [];
    return [...Array(n).keys()].map((i) => given[i] || `${prefix} ${i}`);
  };

  // ------------------------------------------------------------------ controls
  function controls() {
    const [L, H] = shape();
    const bar = el("div", { class: "ar-controls" });

    if (L > 1) {
      const layerNames = names("layer_names", "layer", L);
      const select = el("select", { class: "ar-layer", "aria-label": "layer" });
      layerNames.forEach((name, l) => {
        const option = el("option", { value: String(l) }, name);
        if (l === get("layer")) option.selected = true;
        select.appendChild(option);
      });
      select.addEventListener("change", () => set("layer", Number(select.value)));
      bar.append(el("span", { class: "ar-label" }, "Layer"), select);
    }

    if (H > 1) {
      const headNames = names("head_names", "head", H);
      const group = el("span", { class: "ar-heads", role: "group", "aria-label": "head" });
      const button = (label, title, active, onClick, cls) => {
        const b = el("button", { type: "button", class: `ar-head ${cls || ""}`, title }, label);
        if (active) b.classList.add("ar-on");
        b.addEventListener("click", onClick);
        group.appendChild(b);
      };
      const view = get("view");
      headNames.forEach((name, h) => button(String(h), name, view === "head" && get("head") === h,
        () => { model.set("head", h); set("view", "head"); }, "ar-head-one"));
      button("avg", "the average of all heads of this layer", view === "average",
        () => set("view", "average"), "ar-head-avg");
      button("all", "every head of this layer as a small heatmap", view === "grid",
        () => set("view", "grid"), "ar-head-all");
      bar.append(el("span", { class: "ar-label" }, "Head"), group);
    }

    const dir = el("span", { class: "ar-direction", role: "group", "aria-label": "direction" });
    for (const [value, label, title] of [
      ["query", "query → key", "pick a query: which keys does it attend to? (a row of P)"],
      ["key", "key ← query", "pick a key: which queries attend to it? (a column of P)"]]) {
      const b = el("button", { type: "button", class: `ar-dir ar-dir-${value}`, title }, label);
      if (get("direction") === value) b.classList.add("ar-on");
      b.addEventListener("click", () => set("direction", value));
      dir.appendChild(b);
    }
    bar.append(dir);

    const sinks = get("sinks");
    const tokens = get("tokens");
    const label = el("label", { class: "ar-sinks-toggle" });
    const box = el("input", { type: "checkbox", class: "ar-hide-sinks" });
    box.checked = Boolean(get("hide_sinks"));
    box.disabled = sinks.length === 0;
    box.addEventListener("change", () => set("hide_sinks", box.checked));
    const sinkNames = sinks.map((i) => tokens[i]).filter((t, k, all) => all.indexOf(t) === k);
    label.append(box, document.createTextNode(
      sinks.length ? ` hide ${sinkNames.join(", ")}` : " no sink tokens to hide"));
    label.title = "Sink tokens ([CLS], [SEP], BOS) often take most of a row's weight.";
    bar.append(label);
    return bar;
  }

  // ------------------------------------------------------------------ shared pieces
  function activeToken() {
    const side = get("direction") === "query" ? "q" : "k";
    if (local.hover && local.hover.side === side) return local.hover.index;
    const selected = get("selected");
    return selected >= 0 ? selected : null;
  }

  // "layer 3 · head 1", "layer 3 · average of 12 heads"; head = -1 for the average
  function headLabel(head = get("view") === "average" ? -1 : get("head")) {
    const [L, H] = shape();
    const layerName = L > 1 ? names("layer_names", "layer", L)[get("layer")] + " · " : "";
    if (head < 0) return `${layerName}average of ${H} heads`;
    return layerName + (H > 1 ? names("head_names", "head", H)[head] : "");
  }

  function pairText(i, j, raw, shown, where = headLabel()) {
    const tokens = get("tokens");
    const rescaled = get("hide_sinks") && get("sinks").length
      ? ` (${fmt(shown)} of the weight left without the hidden tokens)` : "";
    return `${where ? where + ": " : ""}query “${tokens[i]}” (${i}) → key “${tokens[j]}” (${j}): ` +
      `p = ${fmt(raw)}${rescaled}`;
  }

  function hint() {
    if (get("direction") === "query") {
      return "Hover a query token (left) to see the keys it attends to; click to pin it. " +
        "Hover a key to read the exact weight.";
    }
    return "Hover a key token (right) to see which queries attend to it; click to pin it. " +
      "Hover a query to read the exact weight.";
  }

  function sinkNote() {
    const sinks = get("sinks");
    if (!get("hide_sinks") || !sinks.length) return null;
    const tokens = get("tokens");
    return el("div", { class: "ar-note" },
      `Hidden: ${sinks.map((i) => `${tokens[i]} (${i})`).join(", ")}. Each query's remaining ` +
      "weights are rescaled to sum to 1 (divided by 1 − its weight on the hidden tokens): sinks " +
      "often take most of a row and would leave every other line too faint to read. The readout " +
      "still gives the true weight p.");
  }

  function colourBar(label) {
    // The ramp is uniform in √p; ticks sit where their p falls.
    const bar = el("div", { class: "ar-colourbar" });
    const ramp = el("span", { class: "ar-ramp" });
    const stops = [...Array(11).keys()].map((k) => colour((k / 10) ** 2));
    ramp.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
    for (const p of [0, 0.05, 0.25, 0.5, 1]) {
      const tick = el("span", { class: "ar-tick" }, String(p));
      tick.style.left = `${(100 * Math.sqrt(p)).toFixed(1)}%`;
      ramp.appendChild(tick);
    }
    bar.append(ramp, el("span", { class: "ar-ramp-label" }, `${label} (colour ∝ √p)`));
    return bar;
  }

  // ------------------------------------------------------------------ head / average view
  function linesView(m, readout) {
    const tokens = get("tokens");
    const n = m.keep.length;
    const rowH = Math.max(14, Math.min(24, Math.floor(600 / Math.max(n, 1))));
    const font = Math.min(13, rowH - 3);
    const colW = Math.min(150, 24 + font * 0.62 * Math.max(...m.keep.map((i) => shortLabel(tokens[i]).length), 3));
    const gap = 170;
    const margin = 34;  // room for the weight numbers outside the token boxes
    const width = 2 * colW + gap + 2 * margin;
    const height = n * rowH + 8;
    const box = svg("svg", { class: "ar-lines", width, height, viewBox: `0 0 ${width} ${height}` });
    const xl = margin + colW, xr = margin + colW + gap;
    const y = (r) => 4 + r * rowH + rowH / 2;

    const idle = svg("g", { class: "ar-idle" });
    const focus = svg("g", { class: "ar-focus" });
    for (let r = 0; r < n; r++) {
      for (let c = 0; c < n; c++) {
        const p = m.shown[r][c];
        if (p < 0.01) continue;
        idle.appendChild(svg("line", { x1: xl + 4, y1: y(r), x2: xr - 4, y2: y(c),
          stroke: colour(0.3 + 0.7 * p), "stroke-opacity": (0.8 * Math.sqrt(p)).toFixed(3),
          "stroke-width": (0.75 + 2 * p).toFixed(2) }));
      }
    }
    box.append(idle, focus);

    const rows = { q: [], k: [] };
    for (const side of ["q", "k"]) {
      for (let r = 0; r < n; r++) {
        const i = m.keep[r];
        const g = svg("g", { class: `ar-token ar-${side}`, "data-index": i, "data-row": r });
        const x = side === "q" ? margin : xr;
        g.appendChild(svg("rect", { x: x + 1, y: y(r) - rowH / 2 + 1, width: colW - 2, height: rowH - 2, rx: 3 }));
        const text = svg("text", { x: side === "q" ? xl - 6 : xr + 6, y: y(r), "font-size": font,
          "text-anchor": side === "q" ? "end" : "start", "dominant-baseline": "central" });
        text.textContent = shortLabel(tokens[i]);
        const num = svg("text", { class: "ar-weight", x: side === "q" ? margin - 4 : xr + colW + 4, y: y(r),
          "font-size": Math.max(9, font - 2), "text-anchor": side === "q" ? "end" : "start",
          "dominant-baseline": "central" });
        const tip = svg("title");
        tip.textContent = `${tokens[i]} (position ${i})`;
        g.append(tip, text, num);
        rows[side].push(g);
        g.addEventListener("mouseenter", () => { local.hover = { side, index: i }; drawFocus(); });
        g.addEventListener("mouseleave", () => { local.hover = null; drawFocus(); });
        g.addEventListener("click", () => {
          if ((side === "q") !== (get("direction") === "query")) return;
          set("selected", get("selected") === i ? -1 : i);
        });
        // the keyboard does what the mouse does: Tab to a token, Enter or Space to pin it
        g.setAttribute("tabindex", "0");
        g.setAttribute("role", "button");
        g.setAttribute("aria-label", `${side === "q" ? "query" : "key"} ${tokens[i]} (position ${i})`);
        g.addEventListener("focus", () => { local.hover = { side, index: i }; drawFocus(); });
        g.addEventListener("blur", () => { local.hover = null; drawFocus(); });
        g.addEventListener("keydown", (event) => {
          if (event.key === "Enter" || event.key === " ") { event.preventDefault(); g.dispatchEvent(new MouseEvent("click")); }
        });
        box.appendChild(g);
      }
    }

    function drawFocus() {
      const active = activeToken();
      const byQuery = get("direction") === "query";
      focus.replaceChildren();
      idle.style.display = active === null ? "" : "none";
      box.dataset.active = active === null ? "" : String(active);
      for (const side of ["q", "k"]) {
        rows[side].forEach((g) => {
          g.classList.remove("ar-active", "ar-target", "ar-pinned");
          g.querySelector("rect").style.fill = "";
          g.classList.remove("ar-dark");
          g.querySelector(".ar-weight").textContent = "";
          g.removeAttribute("data-weight");
        });
      }
      let text = hint();
      if (active !== null && m.keep.includes(active)) {
        const a = m.keep.indexOf(active);
        const own = byQuery ? rows.q[a] : rows.k[a];
        own.classList.add("ar-active");
        if (get("selected") === active) own.classList.add("ar-pinned");
        const other = byQuery ? rows.k : rows.q;
        for (let b = 0; b < n; b++) {
          const [r, c] = byQuery ? [a, b] : [b, a];
          const p = m.shown[r][c];
          const g = other[b];
          g.dataset.weight = fmt(p);
          g.querySelector("rect").style.fill = colour(p);
          g.classList.add("ar-target");
          if (p >= 0.3) g.classList.add("ar-dark");  // white label on the darkest fills
          if (p >= 0.005) g.querySelector(".ar-weight").textContent = p.toFixed(2).replace(/^0/, "");
          if (p < 0.005) continue;
          const line = svg("line", { class: "ar-line", x1: xl + 4, y1: y(r), x2: xr - 4, y2: y(c),
            stroke: colour(0.3 + 0.7 * p), "stroke-width": (0.75 + 7 * p).toFixed(2),
            "stroke-opacity": (0.35 + 0.65 * p).toFixed(3), "data-q": m.keep[r], "data-k": m.keep[c],
            "data-weight": fmt(p) });
          line.addEventListener("mouseenter", () => {
            readout.textContent = pairText(m.keep[r], m.keep[c], m.raw[r][c], m.shown[r][c]);
          });
          focus.appendChild(line);
        }
        const hovered = local.hover;
        if (hovered && hovered.side !== (byQuery ? "q" : "k") && m.keep.includes(hovered.index)) {
          const b = m.keep.indexOf(hovered.index);
          const [r, c] = byQuery ? [a, b] : [b, a];
          text = pairText(m.keep[r], m.keep[c], m.raw[r][c], m.shown[r][c]);
        } else {
          const tokens = get("tokens");
          text = byQuery
            ? `query “${tokens[active]}” (${active}) attends to the keys on the right; hover one for its exact weight.`
            : `key “${tokens[active]}” (${active}) is attended to by the queries on the left; hover one for its exact weight.`;
          if (get("selected") === active) text += " Click it again to unpin.";
        }
      }
      readout.textContent = text;
    }

    const wrap = el("div", { class: "ar-lines-wrap" });
    const heads = el("div", { class: "ar-columns" });
    heads.append(el("span", {}, "queries"), el("span", {}, "keys"));
    heads.style.width = `${width}px`;
    heads.style.padding = `0 ${margin}px`;
    wrap.append(heads, box);
    return { node: wrap, drawFocus };
  }

  // ------------------------------------------------------------------ all heads: small multiples
  function gridView(readout) {
    const tokens = get("tokens");
    const [, H] = shape();
    const P = weights();
    const panels = [...Array(H).keys()].map((h) => ({ h, name: names("head_names", "head", H)[h] }));
    panels.push({ h: -1, name: "average" });
    const first = viewMatrix(P, shape(), get("layer"), 0, get("hide_sinks"), get("sinks"));
    const n = first.keep.length;
    const cell = Math.max(3, Math.min(20, Math.floor(160 / Math.max(n, 1))));

    const wrap = el("div", { class: "ar-grid-wrap" });
    const strip = el("div", { class: "ar-strip" });
    const chips = first.keep.map((i) => {
      const chip = el("button", { type: "button", class: "ar-chip", "data-index": String(i), title: `${tokens[i]} (position ${i})` },
        shortLabel(tokens[i], 12));
      chip.addEventListener("mouseenter", () => { local.hover = { side: get("direction") === "query" ? "q" : "k", index: i }; drawFocus(); });
      chip.addEventListener("mouseleave", () => { local.hover = null; drawFocus(); });
      chip.addEventListener("click", () => set("selected", get("selected") === i ? -1 : i));
      strip.appendChild(chip);
      return chip;
    });
    const grid = el("div", { class: "ar-grid" });
    const overlays = [];
    for (const { h, name } of panels) {
      const m = h === 0 ? first : viewMatrix(P, shape(), get("layer"), h, get("hide_sinks"), get("sinks"));
      const panel = el("figure", { class: "ar-panel", "data-head": String(h), title: `${name}: click to open` });
      const canvas = el("canvas", { width: String(n * cell), height: String(n * cell) });
      const ctx = canvas.getContext("2d");
      for (let r = 0; r < n; r++) {
        for (let c = 0; c < n; c++) { ctx.fillStyle = colour(m.shown[r][c]); ctx.fillRect(c * cell, r * cell, cell, cell); }
      }
      const overlay = el("canvas", { class: "ar-overlay", width: String(n * cell), height: String(n * cell) });
      overlays.push(overlay);
      const stack = el("div", { class: "ar-stack" });
      stack.append(canvas, overlay);
      overlay.addEventListener("mousemove", (event) => {
        const rect = overlay.getBoundingClientRect();
        const c = Math.floor((event.clientX - rect.left) / cell), r = Math.floor((event.clientY - rect.top) / cell);
        if (r < 0 || c < 0 || r >= n || c >= n) return;
        readout.textContent = pairText(m.keep[r], m.keep[c], m.raw[r][c], m.shown[r][c], headLabel(h));
      });
      overlay.addEventListener("mouseleave", () => drawFocus());
      panel.addEventListener("click", () => {
        if (h < 0) set("view", "average");
        else { model.set("head", h); set("view", "head"); }
      });
      panel.append(stack, el("figcaption", {}, name));
      grid.appendChild(panel);
    }

    function drawFocus() {
      const active = activeToken();
      const byQuery = get("direction") === "query";
      chips.forEach((chip) => {
        const i = Number(chip.dataset.index);
        chip.classList.toggle("ar-active", i === active);
        chip.classList.toggle("ar-pinned", i === get("selected"));
      });
      const a = active === null ? -1 : first.keep.indexOf(active);
      for (const overlay of overlays) {
        const ctx = overlay.getContext("2d");
        ctx.clearRect(0, 0, overlay.width, overlay.height);
        if (a < 0) continue;
        ctx.fillStyle = "rgba(255, 255, 255, 0.6)";
        if (byQuery) {
          ctx.fillRect(0, 0, overlay.width, a * cell);
          ctx.fillRect(0, (a + 1) * cell, overlay.width, overlay.height - (a + 1) * cell);
        } else {
          ctx.fillRect(0, 0, a * cell, overlay.height);
          ctx.fillRect((a + 1) * cell, 0, overlay.width - (a + 1) * cell, overlay.height);
        }
        ctx.strokeStyle = "#d95f02";
        ctx.lineWidth = 1.5;
        if (byQuery) ctx.strokeRect(0.75, a * cell + 0.75, overlay.width - 1.5, cell - 1.5);
        else ctx.strokeRect(a * cell + 0.75, 0.75, cell - 1.5, overlay.height - 1.5);
      }
      root.dataset.active = active === null ? "" : String(active);
      readout.textContent = active === null
        ? (byQuery ? "Hover or click a token to see its row (the query's weights) in every head; "
          : "Hover or click a token to see its column (the weights it receives) in every head; ") +
          "hover a cell for its exact weight; click a panel to open that head."
        : `${byQuery ? "query" : "key"} “${tokens[active]}” (${active}) is highlighted as a ` +
          `${byQuery ? "row" : "column"} in every head; hover a cell for its exact weight.`;
    }

    const axes = el("div", { class: "ar-axes" }, "each panel: rows = queries, columns = keys");
    wrap.append(strip, axes, grid);
    return { node: wrap, drawFocus };
  }

  // ------------------------------------------------------------------ draw everything
  let current = null;
  function draw() {
    const [L, H, N] = shape();
    const view = H > 1 ? get("view") : "head";
    root.replaceChildren();
    root.dataset.layer = String(get("layer"));
    root.dataset.head = String(get("head"));
    root.dataset.view = view;
    root.dataset.direction = get("direction");
    root.dataset.hideSinks = String(Boolean(get("hide_sinks")));
    root.dataset.selected = String(get("selected"));
    root.dataset.tokens = String(N);
    if (get("title")) root.appendChild(el("div", { class: "ar-title" }, get("title")));
    root.appendChild(controls());
    const note = sinkNote();
    if (note) root.appendChild(note);
    const readout = el("div", { class: "ar-readout", "aria-live": "polite" });
    if (view === "grid") {
      current = gridView(readout);
    } else {
      const m = viewMatrix(weights(), [L, H, N], get("layer"), view === "average" ? -1 : get("head"),
        get("hide_sinks"), get("sinks"));
      current = linesView(m, readout);
    }
    root.append(current.node, readout,
      colourBar(get("hide_sinks") && get("sinks").length ? "weight, rescaled without the hidden tokens" : "attention weight p"));
    current.drawFocus();
  }

  const redraw = () => draw();
  for (const key of KEYS) model.on(`change:${key}`, redraw);
  draw();
  return () => { for (const key of KEYS) model.off(`change:${key}`, redraw); };
}

export default { render };
