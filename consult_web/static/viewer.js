/* Study image viewer: zoom/pan, window/level, AI heatmaps and annotations.
 *
 * One SVG stage whose viewBox is in SOURCE pixel coordinates (x = column, y = row):
 * the server-rendered picture is an <image> of width=columns height=rows, heatmaps are
 * <image>s placed at their box, and annotations are SVG shapes in the same coordinates,
 * so everything stays on the anatomy at any zoom, render size or window. Zoom and pan
 * only change the viewBox. User text is only ever set with textContent.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const dataEl = document.getElementById("viewer-data");
  const svg = document.getElementById("viewer-svg");
  const imageEl = document.getElementById("viewer-image");
  if (!dataEl || !svg || !imageEl) return;
  const V = JSON.parse(dataEl.textContent);
  if (!V.images || !V.images.length) return;

  const $ = (id) => document.getElementById(id);
  const stage = $("viewer-stage");
  const heatmapGroup = $("heatmap-group");
  const annotationGroup = $("annotation-group");
  const draftGroup = $("draft-group");
  const textInput = $("viewer-text-input");
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const KIND_KEYS = {
    rect: "viewer.tool.rect", ellipse: "viewer.tool.ellipse", arrow: "viewer.tool.arrow",
    freehand: "viewer.tool.freehand", text: "viewer.tool.text",
  };
  const DRAW_TOOLS = ["rect", "ellipse", "arrow", "freehand", "text"];
  const PRESET_KEYS = { "1": "dicom", "2": "lung", "3": "mediastinum", "4": "bone" };
  const TOOL_KEYS = { v: "pan", w: "wl", m: "measure", b: "rect", e: "ellipse", a: "arrow", f: "freehand", t: "text" };
  const MAX_ZOOM = 40;
  const MIN_ZOOM = 0.5;
  const HIRES_STEP = 2048;
  const MAX_POINTS = 5000;

  const state = {
    img: V.images[0],
    tool: "pan",
    view: null,            // {x, y, w, h}: the viewBox, source pixels
    renderSize: V.default_size,
    preset: "dicom",
    window: null,          // explicit {wc, ww} after a W/L drag, else null (preset)
    shownWindow: null,     // window of the picture on screen, for the drag preview
    windows: null,         // presets JSON of the current image
    loadToken: 0,
    annotations: V.annotations || [],
    selectedId: null,
    drag: null,
    heatmapOn: {},
    hiresTimer: null,
  };

  function t(key) {
    return (V.i18n && V.i18n[key]) || key;
  }

  function el(name, attrs) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  function status(message, isError) {
    const box = $("viewer-status");
    if (!box) return;
    box.textContent = message || "";
    box.classList.toggle("error", !!isError);
    box.hidden = !message;
  }

  function maxSide() {
    return Math.max(state.img.columns, state.img.rows);
  }

  // ---- view: zoom and pan ---------------------------------------------------------------

  function setView(view) {
    const cols = state.img.columns;
    const rows = state.img.rows;
    const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, cols / view.w));
    const w = cols / zoom;
    const h = rows / zoom;
    let cx = view.x + view.w / 2;
    let cy = view.y + view.h / 2;
    cx = Math.min(cols, Math.max(0, cx));
    cy = Math.min(rows, Math.max(0, cy));
    state.view = { x: cx - w / 2, y: cy - h / 2, w: w, h: h };
    svg.setAttribute("viewBox", [state.view.x, state.view.y, w, h].map((v) => v.toFixed(2)).join(" "));
    const zoomBox = $("viewer-zoom");
    if (zoomBox) zoomBox.textContent = Math.round(zoom * 100) + "%";
    renderShapes();
    scheduleHires();
  }

  function resetView() {
    setView({ x: 0, y: 0, w: state.img.columns, h: state.img.rows });
  }

  function zoomAt(point, factor) {
    const v = state.view;
    const w = v.w / factor;
    const h = v.h / factor;
    setView({ x: point.x - (point.x - v.x) / factor, y: point.y - (point.y - v.y) / factor, w: w, h: h });
  }

  function center() {
    return { x: state.view.x + state.view.w / 2, y: state.view.y + state.view.h / 2 };
  }

  function toImage(evt) {
    const matrix = svg.getScreenCTM();
    const pt = svg.createSVGPoint();
    pt.x = evt.clientX;
    pt.y = evt.clientY;
    const p = matrix ? pt.matrixTransform(matrix.inverse()) : pt;
    return { x: p.x, y: p.y };
  }

  function clampToImage(p) {
    return {
      x: Math.round(Math.min(state.img.columns, Math.max(0, p.x)) * 10) / 10,
      y: Math.round(Math.min(state.img.rows, Math.max(0, p.y)) * 10) / 10,
    };
  }

  function screenScale() {
    const matrix = svg.getScreenCTM();
    return matrix ? matrix.a : 1; // CSS px per source px
  }

  // ---- the picture: server renders, resolution and window/level --------------------------

  function currentWindow() {
    if (state.window) return state.window;
    return state.windows ? state.windows.presets[state.preset] : null;
  }

  function renderUrl(size) {
    const params = new URLSearchParams({ size: String(size) });
    if (state.window) {
      params.set("wc", state.window.wc.toFixed(2));
      params.set("ww", state.window.ww.toFixed(2));
    } else {
      params.set("preset", state.preset);
    }
    return state.img.render_url + "?" + params.toString();
  }

  function loadRender() {
    const token = ++state.loadToken;
    const url = renderUrl(state.renderSize);
    const wanted = currentWindow();
    const loader = new Image();
    status(t("viewer.loading"));
    imageEl.setAttribute("data-loading", "true"); // a hook for tests: the new render is not shown yet
    loader.onload = function () {
      if (token !== state.loadToken) return;
      imageEl.setAttribute("href", url);
      imageEl.removeAttribute("filter");
      imageEl.removeAttribute("data-loading");
      state.shownWindow = wanted;
      status("");
    };
    loader.onerror = function () {
      if (token !== state.loadToken) return;
      imageEl.removeAttribute("filter");
      imageEl.removeAttribute("data-loading");
      showRenderError(url);
    };
    loader.src = url;
    updateWindowReadout();
  }

  // The <img> load does not say why it failed: ask once more for the error page
  // (rare: the image could not be decoded) and show its detail line as text.
  function showRenderError(url) {
    fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then((r) => (r.ok ? "" : r.text()))
      .then((html) => {
        const node = html ? new DOMParser().parseFromString(html, "text/html").querySelector("#error-detail") : null;
        const detail = node ? node.textContent.trim() : "";
        status(t("viewer.render_error") + (detail ? " " + detail : ""), true);
      })
      .catch(() => status(t("viewer.render_error"), true));
  }

  function scheduleHires() {
    clearTimeout(state.hiresTimer);
    state.hiresTimer = setTimeout(maybeHires, 250);
  }

  function maybeHires() {
    const full = maxSide();
    if (state.renderSize >= full) return;
    const onScreen = full * screenScale() * (window.devicePixelRatio || 1);
    if (onScreen <= 1.5 * state.renderSize) return;
    state.renderSize = onScreen > 1.5 * HIRES_STEP || full <= HIRES_STEP ? full : HIRES_STEP;
    loadRender();
  }

  function loadWindows() {
    const img = state.img;
    fetch(img.windows_url, { credentials: "same-origin" })
      .then((r) => r.json().then((body) => ({ ok: r.ok, body: body })))
      .then((res) => {
        if (img !== state.img) return;
        if (!res.ok) {
          status(res.body.message || t("viewer.render_error") + " " + (res.body.detail || ""), true);
          return;
        }
        state.windows = res.body;
        if (!state.shownWindow) state.shownWindow = currentWindow();
        updateWindowReadout();
      })
      .catch(() => status(t("viewer.render_error"), true));
  }

  function updateWindowReadout() {
    const box = $("viewer-window");
    const w = currentWindow();
    if (!box) return;
    box.textContent = w ? t("viewer.window_value").replace("{wc}", fmt(w.wc)).replace("{ww}", fmt(w.ww)) : "";
  }

  function fmt(value) {
    return Math.abs(value) >= 100 ? String(Math.round(value)) : value.toFixed(2);
  }

  function setPreset(name) {
    state.preset = name;
    state.window = null;
    document.querySelectorAll("#viewer button[data-preset]").forEach((b) => {
      const on = b.dataset.preset === name;
      b.classList.toggle("active", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    loadRender();
  }

  /* Preview of a new window on the already-loaded 8-bit picture: a linear map of its grey
   * levels (exact inside the old window, clipped outside), until the server render arrives. */
  function previewWindow(next) {
    const shown = state.shownWindow;
    if (!shown) return;
    const slope = shown.ww / next.ww;
    let intercept = (shown.wc - shown.ww / 2 - next.wc + next.ww / 2) / next.ww;
    if (state.windows && state.windows.inverted) intercept = 1 - slope - intercept;
    document.querySelectorAll("#wl-preview feComponentTransfer > *").forEach((f) => {
      f.setAttribute("slope", slope.toFixed(4));
      f.setAttribute("intercept", intercept.toFixed(4));
    });
    imageEl.setAttribute("filter", "url(#wl-preview)");
  }

  // ---- heatmaps ---------------------------------------------------------------------------

  function colormap(v) {
    // A "jet"-like ramp: blue -> cyan -> yellow -> red.
    const r = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 3)));
    const g = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 2)));
    const b = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 1)));
    return [r * 255, g * 255, b * 255];
  }

  function heatmapDataUrl(grid) {
    const h = grid.length;
    const w = h ? grid[0].length : 0;
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, w);
    canvas.height = Math.max(1, h);
    const ctx = canvas.getContext("2d");
    const data = ctx.createImageData(canvas.width, canvas.height);
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        const v = Math.min(1, Math.max(0, Number(grid[i][j]) || 0));
        const [r, g, b] = colormap(v);
        const k = 4 * (i * w + j);
        data.data[k] = r;
        data.data[k + 1] = g;
        data.data[k + 2] = b;
        data.data[k + 3] = v < 0.15 ? 0 : Math.min(255, ((v - 0.15) / 0.5) * 255); // cold areas stay clear
      }
    }
    ctx.putImageData(data, 0, 0);
    // Smooth the coarse grid once here: browsers upscale small SVG images with visible seams.
    const smooth = document.createElement("canvas");
    smooth.width = Math.max(1, w) * 32;
    smooth.height = Math.max(1, h) * 32;
    const sctx = smooth.getContext("2d");
    sctx.imageSmoothingEnabled = true;
    sctx.imageSmoothingQuality = "high";
    sctx.drawImage(canvas, 0, 0, smooth.width, smooth.height);
    return smooth.toDataURL("image/png");
  }

  function pct(value) {
    return (100 * value).toFixed(1) + "%";
  }

  function buildHeatmaps() {
    heatmapGroup.replaceChildren();
    const list = $("heatmap-toggles");
    if (list) list.replaceChildren();
    const maps = state.img.heatmaps || [];
    if (!maps.length && list) {
      const note = document.createElement("p");
      note.className = "muted small";
      note.textContent = t("viewer.heatmap_none");
      list.appendChild(note);
    }
    maps.forEach((map) => {
      const [top, left, height, width] = map.box;
      const layer = el("image", {
        class: "heatmap-layer", x: left, y: top, width: width, height: height, preserveAspectRatio: "none",
      });
      layer.dataset.label = map.label;
      layer.setAttribute("href", heatmapDataUrl(map.grid));
      layer.style.display = state.heatmapOn[map.label] ? "" : "none";
      heatmapGroup.appendChild(layer);
      if (list) list.appendChild(heatmapToggle(map, layer));
    });
  }

  function heatmapToggle(map, layer) {
    const label = document.createElement("label");
    label.className = "heatmap-item";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.className = "heatmap-toggle";
    box.dataset.label = map.label;
    box.checked = !!state.heatmapOn[map.label];
    box.addEventListener("change", () => {
      state.heatmapOn[map.label] = box.checked;
      layer.style.display = box.checked ? "" : "none";
    });
    const name = document.createElement("span");
    name.className = "heatmap-name";
    name.textContent = (V.i18n || {})["finding." + map.label] || map.label.replace(/_/g, " "); // the user's language
    const numbers = document.createElement("span");
    numbers.className = "muted small";
    numbers.textContent = " " + t("viewer.probability") + " " + pct(map.probability) + " · " +
      t("viewer.threshold") + " " + pct(map.threshold);
    label.append(box, " ", name, numbers);
    return label;
  }

  // ---- annotations: drawing them ----------------------------------------------------------

  function fontSize(px) {
    return px / screenScale();
  }

  function shapeFor(a) {
    const g = a.geometry;
    switch (a.kind) {
      case "rect":
        return [el("rect", { x: g.x, y: g.y, width: g.w, height: g.h })];
      case "ellipse":
        return [el("ellipse", { cx: g.cx, cy: g.cy, rx: g.rx, ry: g.ry })];
      case "arrow":
        return arrowShapes(g);
      case "freehand":
        return [el("polyline", { points: g.points.map((p) => p[0] + "," + p[1]).join(" ") })];
      case "text": {
        const text = el("text", { x: g.x, y: g.y, "font-size": fontSize(16).toFixed(2), class: "annotation-text" });
        text.textContent = a.label;
        return [text];
      }
      default:
        return [];
    }
  }

  function arrowShapes(g) {
    const dx = g.x2 - g.x1;
    const dy = g.y2 - g.y1;
    const length = Math.hypot(dx, dy) || 1;
    const head = Math.min(length * 0.4, fontSize(14));
    const ux = dx / length;
    const uy = dy / length;
    const bx = g.x2 - ux * head;
    const by = g.y2 - uy * head;
    const wing = head * 0.5;
    const points = [
      [g.x2, g.y2], [bx - uy * wing, by + ux * wing], [bx + uy * wing, by - ux * wing],
    ].map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
    return [el("line", { x1: g.x1, y1: g.y1, x2: bx, y2: by }), el("polygon", { points: points, class: "arrow-head" })];
  }

  function labelAnchor(a) {
    const g = a.geometry;
    switch (a.kind) {
      case "rect": return { x: g.x, y: g.y };
      case "ellipse": return { x: g.cx - g.rx, y: g.cy - g.ry };
      case "arrow": return { x: g.x1, y: g.y1 };
      case "freehand": return { x: g.points[0][0], y: g.points[0][1] };
      default: return null;
    }
  }

  function whenText(iso) {
    if (!iso) return "";
    try {
      return new Date(iso).toLocaleString(V.language === "vi" ? "vi-VN" : "en-GB", {
        timeZone: V.timezone || undefined, dateStyle: "short", timeStyle: "short",
      });
    } catch (e) {
      return new Date(iso).toLocaleString();
    }
  }

  function describe(a) {
    let text = t(KIND_KEYS[a.kind]) + " · " + a.author + " · " + whenText(a.created_at);
    if (a.updated_at && a.created_at && Date.parse(a.updated_at) - Date.parse(a.created_at) > 1000) {
      text += " (" + t("viewer.edited") + ")";
    }
    return text;
  }

  function imageAnnotations() {
    return state.annotations.filter((a) => a.instance_uid === state.img.sop_uid);
  }

  function renderAnnotations() {
    renderShapes();
    renderList();
  }

  /* The marks on the stage; re-drawn on zoom so that labels and arrow heads keep their screen size. */
  function renderShapes() {
    if (!state.view) return;
    annotationGroup.replaceChildren();
    imageAnnotations().forEach((a) => {
      const group = el("g", { class: "annotation" + (a.id === state.selectedId ? " selected" : "") });
      group.dataset.kind = a.kind;
      group.dataset.id = String(a.id);
      group.style.color = a.color;
      if (a.can_edit) group.classList.add("own");
      const title = el("title");
      title.textContent = (a.label ? a.label + " — " : "") + describe(a);
      group.appendChild(title);
      shapeFor(a).forEach((shape) => group.appendChild(shape));
      const anchor = labelAnchor(a);
      if (anchor && a.label) {
        const text = el("text", {
          x: anchor.x, y: anchor.y - fontSize(4), "font-size": fontSize(13).toFixed(2), class: "annotation-label",
        });
        text.textContent = a.label;
        group.appendChild(text);
      }
      annotationGroup.appendChild(group);
    });
  }

  function renderList() {
    const list = $("annotation-list");
    if (!list) return;
    list.replaceChildren();
    const items = imageAnnotations();
    if (!items.length) {
      const empty = document.createElement("li");
      empty.className = "muted small";
      empty.textContent = t("viewer.no_annotations");
      list.appendChild(empty);
    }
    items.forEach((a) => {
      const item = document.createElement("li");
      item.className = "annotation-item" + (a.id === state.selectedId ? " selected" : "");
      item.dataset.id = String(a.id);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = a.color;
      const label = document.createElement("span");
      label.className = "annotation-item-label";
      label.textContent = a.label || "—";
      const meta = document.createElement("span");
      meta.className = "muted small annotation-item-meta";
      meta.textContent = describe(a);
      item.append(swatch, label, meta);
      item.addEventListener("click", () => select(a.id));
      list.appendChild(item);
    });
    showEditor();
  }

  function select(id) {
    state.selectedId = id;
    renderAnnotations();
  }

  function selected() {
    return state.annotations.find((a) => a.id === state.selectedId) || null;
  }

  function showEditor() {
    const form = $("annotation-edit");
    const hint = $("annotation-hint");
    const a = selected();
    if (!form) return;
    const editable = !!(a && a.can_edit);
    form.hidden = !editable;
    if (hint) hint.textContent = a && !a.can_edit ? t("viewer.read_only") : t("viewer.own_hint");
    if (editable && form.dataset.id !== String(a.id)) {
      form.dataset.id = String(a.id);
      $("annotation-label").value = a.label || "";
      $("annotation-color").value = a.color;
    }
    if (!editable) delete form.dataset.id;
  }

  // ---- annotations: talking to the server ------------------------------------------------

  function api(method, url, body) {
    const headers = { "X-CSRF-Token": csrf, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(url, {
      method: method, headers: headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then((r) => {
      if (r.status === 204) return null;
      return r.json().catch(() => ({})).then((data) => {
        if (!r.ok) throw new Error(data.message || data.detail || String(r.status)); // message: in the user's language
        return data;
      });
    });
  }

  function createAnnotation(kind, geometry, label) {
    const colorInput = $("annotation-color-new");
    const body = {
      instance_uid: state.img.sop_uid, kind: kind, geometry: geometry,
      label: label || "", color: colorInput ? colorInput.value : V.default_color,
    };
    return api("POST", V.annotations_url, body)
      .then((a) => {
        upsert(a);
        status(t("viewer.saved"));
      })
      .catch((err) => status(t("viewer.save_error") + " " + err.message, true));
  }

  function upsert(a) {
    const index = state.annotations.findIndex((x) => x.id === a.id);
    if (index >= 0) state.annotations[index] = a;
    else state.annotations.push(a);
    renderAnnotations();
  }

  function saveSelected(evt) {
    evt.preventDefault();
    const a = selected();
    if (!a || !a.can_edit) return;
    api("PATCH", V.annotation_url + a.id, { label: $("annotation-label").value, color: $("annotation-color").value })
      .then((updated) => { upsert(updated); status(t("viewer.saved")); })
      .catch((err) => status(t("viewer.save_error") + " " + err.message, true));
  }

  function deleteSelected() {
    const a = selected();
    if (!a || !a.can_edit) return;
    api("DELETE", V.annotation_url + a.id)
      .then(() => {
        state.annotations = state.annotations.filter((x) => x.id !== a.id);
        state.selectedId = null;
        renderAnnotations();
        status(t("viewer.deleted"));
      })
      .catch((err) => status(t("viewer.save_error") + " " + err.message, true));
  }

  function reloadAnnotations() {
    fetch(V.annotations_url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error(String(r.status)))))
      .then((data) => {
        state.annotations = data.annotations || [];
        if (!selected()) state.selectedId = null;
        renderAnnotations();
      })
      .catch(() => status(t("viewer.load_error"), true));
  }

  // ---- distance measurement (mm from the file's pixel spacing) -----------------------------

  /* Millimetres of a segment in source pixels, or null when the image has no pixel spacing:
   * spacing.row_mm is the vertical size of a pixel, column_mm the horizontal one. */
  function distanceMm(a, b) {
    const sp = state.img.spacing;
    if (!sp) return null;
    return Math.hypot((b.x - a.x) * sp.column_mm, (b.y - a.y) * sp.row_mm);
  }

  function spacingName() {
    const sp = state.img.spacing;
    if (!sp) return t("viewer.no_spacing");
    if (sp.magnification) return t("viewer.spacing.magnified").replace("{factor}", String(sp.magnification));
    return sp.source === "PixelSpacing" ? t("viewer.spacing.PixelSpacing") : t("viewer.spacing.ImagerPixelSpacing");
  }

  function showSpacing() {
    const box = $("viewer-spacing");
    if (!box) return;
    box.textContent = state.img.spacing ? t("viewer.spacing_used").replace("{spacing}", spacingName()) : spacingName();
    box.classList.toggle("error", !state.img.spacing);
  }

  function measureText(a, b) {
    const mm = distanceMm(a, b);
    if (mm === null) {
      return t("viewer.measure_px").replace("{px}", Math.hypot(b.x - a.x, b.y - a.y).toFixed(0));
    }
    return t("viewer.measure_mm").replace("{mm}", mm.toFixed(1));
  }

  function drawMeasure(a, b) {
    const group = $("measure-group");
    if (!group) return;
    group.replaceChildren();
    const g = el("g", { class: "measure" + (state.img.spacing ? "" : " no-spacing") });
    g.appendChild(el("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y }));
    const label = el("text", { x: b.x, y: b.y, "font-size": fontSize(14), dx: fontSize(6) });
    // On the film: the number only ("px" when there is no spacing); the bar above says why.
    label.textContent = state.img.spacing ? measureText(a, b) : Math.hypot(b.x - a.x, b.y - a.y).toFixed(0) + " px";
    g.appendChild(label);
    group.appendChild(g);
    const readout = $("measure-readout");
    if (readout) {
      readout.textContent = measureText(a, b);
      readout.classList.toggle("error", !state.img.spacing);
    }
  }

  function clearMeasure() {
    const group = $("measure-group");
    if (group) group.replaceChildren();
    const readout = $("measure-readout");
    if (readout) readout.textContent = "";
  }

  // ---- keyboard shortcuts ----------------------------------------------------------------

  function toggleShortcuts(show) {
    const box = $("viewer-shortcuts");
    if (!box) return;
    box.hidden = show === undefined ? !box.hidden : !show;
  }

  function toggleHeatmaps() {
    const boxes = Array.from(document.querySelectorAll("#heatmap-toggles input.heatmap-toggle"));
    if (!boxes.length) { status(t("viewer.heatmap_none")); return; }
    const on = !boxes.some((b) => b.checked);
    boxes.forEach((b) => {
      if (b.checked !== on) { b.checked = on; b.dispatchEvent(new Event("change")); }
    });
  }

  /* Next/previous study in the worklist order the user last saw (static/worklist.js keeps it). */
  function goStudy(step) {
    let order = [];
    try { order = JSON.parse(sessionStorage.getItem("xrt.worklist") || "[]"); } catch (e) { order = []; }
    const at = order.indexOf(V.study_uid);
    const next = at < 0 ? null : order[at + step];
    if (!next) { status(t("viewer.end_of_list")); return; }
    window.location.href = "/studies/" + encodeURIComponent(next);
  }

  // ---- pointer interaction --------------------------------------------------------------

  function setTool(tool) {
    if (DRAW_TOOLS.includes(tool) && !V.can_annotate) return;
    state.tool = tool;
    cancelText();
    document.querySelectorAll("#viewer button[data-tool]").forEach((b) => {
      const on = b.dataset.tool === tool;
      b.classList.toggle("active", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    stage.className = "viewer-stage tool-" + tool;
    if (tool === "measure") {
      showSpacing();
      if (!state.img.spacing) status(t("viewer.no_spacing"), true);
    }
  }

  function onPointerDown(evt) {
    if (evt.button !== 0 || state.drag) return;
    const target = evt.target instanceof Element ? evt.target.closest(".annotation") : null;
    const p = toImage(evt);
    if (state.tool === "pan") {
      if (target) select(Number(target.dataset.id));
      state.drag = { type: "pan", sx: evt.clientX, sy: evt.clientY, view: Object.assign({}, state.view) };
    } else if (state.tool === "wl") {
      const w = currentWindow();
      if (!w) return;
      state.drag = { type: "wl", sx: evt.clientX, sy: evt.clientY, start: { wc: w.wc, ww: w.ww }, next: null };
    } else if (state.tool === "text") {
      evt.preventDefault();
      openText(evt, clampToImage(p));
      return;
    } else if (state.tool === "measure") {
      const start = clampToImage(p);
      state.drag = { type: "measure", start: start, end: start };
      clearMeasure();
    } else if (DRAW_TOOLS.includes(state.tool)) {
      const start = clampToImage(p);
      state.drag = { type: "draw", kind: state.tool, start: start, end: start, points: [[start.x, start.y]] };
    } else {
      return;
    }
    evt.preventDefault();
    try { svg.setPointerCapture(evt.pointerId); } catch (e) { /* synthetic events have no capture */ }
  }

  function onPointerMove(evt) {
    const drag = state.drag;
    if (!drag) return;
    if (drag.type === "pan") {
      const scale = screenScale();
      setView({
        x: drag.view.x - (evt.clientX - drag.sx) / scale, y: drag.view.y - (evt.clientY - drag.sy) / scale,
        w: drag.view.w, h: drag.view.h,
      });
    } else if (drag.type === "wl") {
      const span = state.windows ? state.windows.value_range[1] - state.windows.value_range[0] : drag.start.ww * 2;
      const step = Math.max(span, 1e-6) / 600;
      drag.next = {
        wc: drag.start.wc + (evt.clientY - drag.sy) * step,
        ww: Math.max(step, drag.start.ww + (evt.clientX - drag.sx) * step),
      };
      previewWindow(drag.next);
      const box = $("viewer-window");
      if (box) box.textContent = t("viewer.window_value").replace("{wc}", fmt(drag.next.wc)).replace("{ww}", fmt(drag.next.ww));
    } else if (drag.type === "measure") {
      drag.end = clampToImage(toImage(evt));
      drawMeasure(drag.start, drag.end);
    } else if (drag.type === "draw") {
      const p = clampToImage(toImage(evt));
      drag.end = p;
      if (drag.kind === "freehand") addPoint(drag, p);
      drawDraft(drag);
    }
  }

  function addPoint(drag, p) {
    const last = drag.points[drag.points.length - 1];
    const minStep = 2 / screenScale(); // about 2 screen pixels apart
    if (Math.hypot(p.x - last[0], p.y - last[1]) >= minStep && drag.points.length < MAX_POINTS) {
      drag.points.push([p.x, p.y]);
    }
  }

  function onPointerUp(evt) {
    const drag = state.drag;
    if (!drag) return;
    state.drag = null;
    try { svg.releasePointerCapture(evt.pointerId); } catch (e) { /* not captured */ }
    if (drag.type === "wl" && drag.next) {
      state.window = drag.next;
      document.querySelectorAll("#viewer button[data-preset]").forEach((b) => {
        b.classList.remove("active");
        b.setAttribute("aria-pressed", "false");
      });
      loadRender();
    } else if (drag.type === "draw") {
      draftGroup.replaceChildren();
      const geometry = geometryOf(drag);
      if (geometry) createAnnotation(drag.kind, geometry, "");
    }
  }

  function round1(v) {
    return Math.round(v * 10) / 10;
  }

  /* Geometry of a finished drag, or null when it is too small to be meant (a click). */
  function geometryOf(drag) {
    const a = drag.start;
    const b = drag.end;
    const minimum = 3 / screenScale();
    const w = Math.abs(b.x - a.x);
    const h = Math.abs(b.y - a.y);
    switch (drag.kind) {
      case "rect":
        return w < minimum || h < minimum ? null
          : { x: round1(Math.min(a.x, b.x)), y: round1(Math.min(a.y, b.y)), w: round1(w), h: round1(h) };
      case "ellipse":
        return w < minimum || h < minimum ? null
          : { cx: round1((a.x + b.x) / 2), cy: round1((a.y + b.y) / 2), rx: round1(w / 2), ry: round1(h / 2) };
      case "arrow":
        return Math.hypot(w, h) < minimum ? null : { x1: a.x, y1: a.y, x2: b.x, y2: b.y };
      case "freehand":
        return drag.points.length < 2 ? null : { points: drag.points.slice(0, MAX_POINTS) };
      default:
        return null;
    }
  }

  function drawDraft(drag) {
    draftGroup.replaceChildren();
    const geometry = geometryOf(drag);
    if (!geometry) return;
    const group = el("g", { class: "annotation-draft" });
    const colorInput = $("annotation-color-new");
    group.style.color = colorInput ? colorInput.value : V.default_color;
    shapeFor({ kind: drag.kind, geometry: geometry, label: "" }).forEach((s) => group.appendChild(s));
    draftGroup.appendChild(group);
  }

  function onWheel(evt) {
    evt.preventDefault();
    zoomAt(toImage(evt), Math.exp(-evt.deltaY * 0.0015));
  }

  // ---- the inline text input (text tool) ------------------------------------------------

  function openText(evt, point) {
    if (!textInput) return;
    const box = stage.getBoundingClientRect();
    textInput.hidden = false;
    textInput.value = "";
    textInput.style.left = Math.round(evt.clientX - box.left) + "px";
    textInput.style.top = Math.round(evt.clientY - box.top) + "px";
    textInput.dataset.x = String(point.x);
    textInput.dataset.y = String(point.y);
    textInput.focus(); // pointerdown's preventDefault keeps the focus here
  }

  function cancelText() {
    if (textInput) {
      textInput.hidden = true;
      textInput.value = "";
    }
  }

  function commitText() {
    if (!textInput || textInput.hidden) return;
    const label = textInput.value.trim();
    const geometry = { x: Number(textInput.dataset.x), y: Number(textInput.dataset.y) };
    cancelText();
    if (label) createAnnotation("text", geometry, label);
  }

  // ---- switching images, wiring ---------------------------------------------------------

  function showImage(index) {
    state.img = V.images[index];
    state.windows = null;
    state.shownWindow = null;
    state.window = null;
    state.preset = "dicom";
    state.renderSize = V.default_size;
    state.selectedId = null;
    imageEl.setAttribute("width", state.img.columns);
    imageEl.setAttribute("height", state.img.rows);
    imageEl.setAttribute("href", state.img.first_url);
    buildHeatmaps();
    resetView();
    setPreset("dicom");
    loadWindows();
    clearMeasure();
    showSpacing();
  }

  function wire() {
    document.querySelectorAll("#viewer button[data-tool]").forEach((b) => {
      b.addEventListener("click", () => setTool(b.dataset.tool));
    });
    document.querySelectorAll("#viewer button[data-preset]").forEach((b) => {
      b.addEventListener("click", () => setPreset(b.dataset.preset));
    });
    $("zoom-in").addEventListener("click", () => zoomAt(center(), 1.25));
    $("zoom-out").addEventListener("click", () => zoomAt(center(), 1 / 1.25));
    $("zoom-reset").addEventListener("click", resetView);
    const opacity = $("heatmap-opacity");
    const applyOpacity = () => heatmapGroup.setAttribute("opacity", String(Number(opacity.value) / 100));
    opacity.addEventListener("input", applyOpacity);
    applyOpacity();
    svg.addEventListener("pointerdown", onPointerDown);
    svg.addEventListener("pointermove", onPointerMove);
    svg.addEventListener("pointerup", onPointerUp);
    svg.addEventListener("pointercancel", onPointerUp);
    svg.addEventListener("wheel", onWheel, { passive: false });
    const form = $("annotation-edit");
    if (form) form.addEventListener("submit", saveSelected);
    const del = $("annotation-delete");
    if (del) del.addEventListener("click", deleteSelected);
    if (textInput) {
      textInput.addEventListener("keydown", (evt) => {
        if (evt.key === "Enter") { evt.preventDefault(); commitText(); }
        if (evt.key === "Escape") { evt.preventDefault(); cancelText(); }
      });
      textInput.addEventListener("blur", commitText);
    }
    const picker = $("viewer-image-select");
    if (picker) picker.addEventListener("change", () => showImage(Number(picker.value)));
    document.addEventListener("keydown", onKey);
    const help = $("shortcuts-open");
    if (help) help.addEventListener("click", () => toggleShortcuts());
    const helpClose = $("shortcuts-close");
    if (helpClose) helpClose.addEventListener("click", () => toggleShortcuts(false));
    window.addEventListener("resize", fitStage);
    window.addEventListener("resize", () => { renderShapes(); scheduleHires(); });
    window.addEventListener("xrt:changed", (evt) => {
      const d = evt.detail || {};
      if (d.study_uid === V.study_uid && String(d.kind || "").startsWith("annotation.")) reloadAnnotations();
    });
    imageEl.addEventListener("error", () => showRenderError(imageEl.getAttribute("href")));
  }

  /* The stage fills the window's height below its top edge (at page top), so the whole
   * film is visible without scrolling on a wide screen; narrow screens keep the CSS height. */
  function fitStage() {
    if (!window.matchMedia("(min-width: 1001px)").matches) { stage.style.height = ""; return; }
    const top = stage.getBoundingClientRect().top + window.scrollY;
    const help = document.querySelector("#viewer .viewer-help");
    const below = help ? help.getBoundingClientRect().height + 6 : 0;
    const room = window.innerHeight - top - below - 10;
    stage.style.height = Math.max(320, Math.floor(room)) + "px";
    renderShapes();
  }

  function onKey(evt) {
    const typing = evt.target instanceof HTMLElement && evt.target.matches("input, textarea, select, button[type=submit]");
    if (typing || evt.ctrlKey || evt.metaKey || evt.altKey) return;
    const key = evt.key;
    let handled = true;
    if (key === "?") toggleShortcuts();
    else if (key === "n" || key === "j") goStudy(1);
    else if (key === "p" || key === "k") goStudy(-1);
    else if (PRESET_KEYS[key]) setPreset(PRESET_KEYS[key]);
    else if (key === "+" || key === "=") zoomAt(center(), 1.25);
    else if (key === "-" || key === "_") zoomAt(center(), 1 / 1.25);
    else if (key === "0" || key === "r") resetView();
    else if (key === "h") toggleHeatmaps();
    else if (TOOL_KEYS[key]) setTool(TOOL_KEYS[key]);
    else handled = false;
    if (handled) { evt.preventDefault(); return; }
    if (evt.key === "Escape") {
      toggleShortcuts(false);
      clearMeasure();
      state.drag = null;
      draftGroup.replaceChildren();
      cancelText();
      state.selectedId = null;
      renderAnnotations();
    } else if ((evt.key === "Delete" || evt.key === "Backspace") && selected() && selected().can_edit) {
      evt.preventDefault();
      deleteSelected();
    }
  }

  wire();
  fitStage();
  showSpacing();
  buildHeatmaps();
  resetView();
  renderList();
  loadWindows();
  status("");
})();
