// The completions browser of report/index.html: plain JavaScript over the rows embedded as JSON.
// Text from the table only ever goes in through textContent (never innerHTML).
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("sweep-data").textContent);
  const names = Object.keys(D.columns);
  // Each row also knows its variant (index into D.variants: concept · method · mode), kept apart from
  // the table's own columns so that the details list only those.
  const variantOf = new Map();
  const rows = [];
  for (let i = 0; i < D.n; i++) {
    const r = {};
    for (const c of names) r[c] = D.columns[c][i];
    variantOf.set(r, D.row_variant[i]);
    rows.push(r);
  }
  const has = (c) => names.includes(c);
  const byValue = (a, b) => (typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b)));
  const distinct = (c) => [...new Set(rows.map((r) => r[c]))].sort(byValue);
  const fmt = (v) => {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
    return String(v);
  };
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    Object.assign(e, props || {});
    for (const k of kids) e.append(k);
    return e;
  }

  // The grid's rows: layer-set labels ("10", "10+14", "all"), in the natural order the report uses.
  const layers = D.layer_order;
  const singleLayers = layers.every((l) => /^\d+$/.test(l));
  const layerWords = (l) => (/^\d+$/.test(String(l)) ? "layer " : "layers ") + String(l);
  const multiVariant = D.variants.length > 1;
  const alphas = distinct("alpha");
  const samples = has("sample") ? distinct("sample") : [null];
  const promptIds = Object.keys(D.prompts).sort(byValue);
  const facetCols = Object.keys(D.facets);
  const state = {
    prompt: promptIds[0],
    sample: samples[0],
    facets: Object.fromEntries(facetCols.map((c) => [c, D.facets[c][0]])),
    variant: 0,
    layers: new Set(layers),
    alphas: new Set(alphas),
    metric: D.metrics.includes("behavior_prob") ? "behavior_prob" : D.metrics[0] || "",
    picked: null,
  };
  const range = {};
  for (const m of D.metrics) {
    const v = rows.map((r) => r[m]).filter((x) => typeof x === "number");
    range[m] = v.length ? [Math.min(...v), Math.max(...v)] : null;
  }

  // Rows of the chosen prompt, sample, filters (and variant, unless anyVariant) at one (layers, alpha).
  function matching(layer, alpha, anyVariant) {
    return rows.filter(
      (r) =>
        r.prompt_id === state.prompt &&
        (state.sample === null || r.sample === state.sample) &&
        facetCols.every((c) => String(r[c]) === state.facets[c]) &&
        (anyVariant || variantOf.get(r) === state.variant) &&
        (layer === undefined || r.layers === layer) &&
        (alpha === undefined || r.alpha === alpha)
    );
  }
  // Alpha 0 is the unsteered model in every mode: any alpha-0 row of the prompt will do, the same
  // variant and layers preferred.
  function baseline(layer) {
    return matching(layer, 0)[0] || matching(undefined, 0)[0] || matching(layer, 0, true)[0] || matching(undefined, 0, true)[0] || null;
  }

  // ---- controls
  const controls = document.getElementById("controls");
  function group(label, control) {
    return el("label", { className: "group" }, label, control);
  }
  const search = el("input", { type: "search", id: "prompt-filter", placeholder: "words in the prompt" });
  const promptSel = el("select", { id: "prompt" });
  function fillPrompts() {
    const q = search.value.trim().toLowerCase();
    promptSel.replaceChildren();
    for (const id of promptIds) {
      const text = D.prompts[id];
      if (q && !(id + " " + text).toLowerCase().includes(q)) continue;
      const short = text.length > 90 ? text.slice(0, 90) + "…" : text;
      promptSel.append(el("option", { value: id, textContent: id + ": " + short }));
    }
    if (promptSel.options.length && ![...promptSel.options].some((o) => o.value === state.prompt)) {
      state.prompt = promptSel.options[0].value;
    }
    promptSel.value = state.prompt;
    render();
  }
  search.addEventListener("input", fillPrompts);
  promptSel.addEventListener("change", () => {
    state.prompt = promptSel.value;
    render();
  });
  controls.append(group("filter prompts", search), group("prompt", promptSel));
  if (samples.length > 1) {
    const s = el("select", { id: "sample" });
    for (const v of samples) s.append(el("option", { value: String(v), textContent: String(v) }));
    s.addEventListener("change", () => {
      state.sample = Number(s.value);
      render();
    });
    controls.append(group("sample", s));
  }
  if (multiVariant) {
    const s = el("select", { id: "variant" });
    D.variants.forEach((v, i) => s.append(el("option", { value: String(i), textContent: v })));
    s.addEventListener("change", () => {
      state.variant = Number(s.value);
      render();
    });
    controls.append(group("variant (" + D.variant_columns.join(" · ") + ")", s));
  }
  for (const c of facetCols) {
    const s = el("select", { id: "facet-" + c });
    for (const v of D.facets[c]) s.append(el("option", { value: v, textContent: v }));
    s.addEventListener("change", () => {
      state.facets[c] = s.value;
      render();
    });
    controls.append(group(c, s));
  }
  function checks(id, values, set, label) {
    const box = el("span", { className: "checks", id: id });
    for (const v of values) {
      const cb = el("input", { type: "checkbox", checked: true, value: String(v) });
      cb.addEventListener("change", () => {
        cb.checked ? set.add(v) : set.delete(v);
        render();
      });
      box.append(el("label", {}, cb, " " + fmt(v)));
    }
    return group(label, box);
  }
  controls.append(checks("layer-filter", layers, state.layers, singleLayers ? "layers" : "layer sets"));
  controls.append(checks("alpha-filter", alphas, state.alphas, "alphas"));
  if (D.metrics.length) {
    const s = el("select", { id: "colour-by" });
    for (const m of D.metrics) s.append(el("option", { value: m, textContent: m }));
    s.value = state.metric;
    s.addEventListener("change", () => {
      state.metric = s.value;
      render();
    });
    controls.append(group("shade by", s));
  }

  // ---- the (layer x alpha) grid of one prompt's completions
  function shade(v) {
    const r = range[state.metric];
    if (!r || typeof v !== "number") return "";
    const t = r[1] > r[0] ? (v - r[0]) / (r[1] - r[0]) : 0.5;
    return `hsl(${Math.round(215 - 175 * t)}, 70%, ${Math.round(94 - 14 * t)}%)`;
  }
  function render() {
    const grid = document.getElementById("grid");
    // only the layers and alphas the chosen run / filters have (compared runs may differ)
    const scope = rows.filter((r) => variantOf.get(r) === state.variant && facetCols.every((c) => String(r[c]) === state.facets[c]));
    const ls = layers.filter((l) => state.layers.has(l) && scope.some((r) => r.layers === l));
    const as = alphas.filter((a) => state.alphas.has(a) && scope.some((r) => r.alpha === a));
    const head = el("tr", {}, el("th", { textContent: (singleLayers ? "layer" : "layers") + " \\ alpha" }));
    for (const a of as) {
      head.append(el("th", { textContent: a === 0 ? "0 (unsteered)" : fmt(a), className: a === 0 ? "baseline" : "" }));
    }
    const table = el("table", {}, el("thead", {}, head));
    const body = el("tbody");
    for (const l of ls) {
      const tr = el("tr", {}, el("th", { textContent: fmt(l) }));
      for (const a of as) {
        const hit = matching(l, a);
        if (!hit.length) {
          tr.append(el("td", { className: "empty", textContent: "–" }));
          continue;
        }
        const r = hit[0];
        const text = String(r.completion ?? "");
        const td = el("td", { className: "cell", tabIndex: 0, title: text });
        td.dataset.layer = String(l);
        td.dataset.alpha = String(a);
        td.append(text.length > 160 ? text.slice(0, 160) + "…" : text);
        if (state.metric) td.append(el("span", { className: "value", textContent: state.metric + " " + fmt(r[state.metric]) }));
        td.style.background = shade(r[state.metric]);
        if (state.picked && state.picked[0] === l && state.picked[1] === a) td.classList.add("picked");
        td.addEventListener("click", () => pick(l, a));
        td.addEventListener("keydown", (e) => {
          if (e.key === "Enter" || e.key === " ") pick(l, a);
        });
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    grid.replaceChildren(table);
    showDetail();
  }
  function pick(layer, alpha) {
    state.picked = [layer, alpha];
    render();
  }

  // ---- one cell: its completion beside alpha 0 at the same layer, and every column of both rows
  function showDetail() {
    const detail = document.getElementById("detail");
    if (!state.picked) {
      detail.replaceChildren(el("p", { className: "note", textContent: "Click a cell to see its completion and metrics." }));
      return;
    }
    const [layer, alpha] = state.picked;
    const hit = matching(layer, alpha);
    if (!hit.length) {
      detail.replaceChildren(el("p", { className: "note", textContent: `No row at ${layerWords(layer)}, alpha ${fmt(alpha)} for these filters.` }));
      return;
    }
    const r = hit[0];
    const base = baseline(layer);
    const pane = (title, row, cls) =>
      el("div", { className: "pane " + cls }, el("h3", { textContent: title }),
        el("div", { className: "completion", textContent: row ? String(row.completion ?? "") : "no alpha-0 row in this table" }));
    const vname = multiVariant ? D.variants[state.variant] + ", " : "";
    let baseTitle = "alpha 0 (unsteered)";
    if (base) {
      baseTitle += ", " + layerWords(base.layers);
      if (multiVariant && variantOf.get(base) !== state.variant) baseTitle += " (" + D.variants[variantOf.get(base)] + ")";
    }
    const kids = [
      el("h3", { textContent: `${state.prompt}, ${vname}${layerWords(layer)}, alpha ${fmt(alpha)}` }),
      el("div", { className: "prompt", textContent: D.prompts[state.prompt] }),
      el("div", { className: "pair" }, pane(`${vname}${layerWords(layer)}, alpha ${fmt(alpha)}`, r, "steered"), pane(baseTitle, base, "unsteered")),
    ];
    if (hit.length > 1) kids.push(el("p", { className: "note", textContent: `${hit.length} rows match these filters; showing the first.` }));
    const t = el("table", { id: "detail-columns" }, el("tr", {}, el("th", { textContent: "column" }), el("th", { textContent: "this row" }), el("th", { textContent: "alpha 0" })));
    for (const c of names) {
      if (c === "completion") continue;
      const cell = (v) => el("td", { className: typeof v === "number" ? "num" : "", textContent: fmt(v) });
      t.append(el("tr", {}, el("th", { textContent: c }), cell(r[c]), cell(base ? base[c] : null)));
    }
    kids.push(t);
    detail.replaceChildren(...kids);
  }

  fillPrompts();
})();
