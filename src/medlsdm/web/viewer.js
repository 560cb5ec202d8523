// medlsdm viewer: NiiVue canvases with shared controls (plane, window/level, zoom) and linked
// cursors. Used by the reader-study page and by the evaluation reports.
// Mouse (NiiVue's own): wheel = next/previous slice, left click/drag = move the cursor,
// right drag = window/level, middle drag = pan.
(function () {
  "use strict";
  const nvlib = window.niivue;
  const all = [];  // every viewer on the page, for the page's own tests and scripts

  // One canvas showing `layers` (first = image, then overlays), each
  // {base64, colormap, opacity, calMin, calMax}. Returns the Niivue instance.
  async function create(canvas, layers, options) {
    const opts = Object.assign({ sliceType: "multiplanar" }, options || {});
    const nv = new nvlib.Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [1, 0.85, 0, 0.8], crosshairWidth: 0.6, crosshairWidthUnit: "percent",
      show3Dcrosshair: false, dragAndDropEnabled: false, logLevel: "error", loadingText: "",
      isOrientationTextVisible: true, multiplanarShowRender: nvlib.SHOW_RENDER.NEVER,
      mouseEventConfig: { leftButton: { primary: nvlib.DRAG_MODE.crosshair },
                          rightButton: nvlib.DRAG_MODE.contrast, centerButton: nvlib.DRAG_MODE.pan },
    });
    await nv.attachToCanvas(canvas);
    await setLayers(nv, layers);
    setPlane(nv, opts.sliceType);
    all.push(nv);
    return nv;
  }

  // Distinct colours for label values 1..n (0 transparent), cycling after ten.
  const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                   [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];
  function labelColours(n) {
    const lut = { R: [0], G: [0], B: [0], A: [0], I: [0] };
    for (let v = 1; v <= n; v++) {
      const c = PALETTE[(v - 1) % PALETTE.length];
      lut.R.push(c[0]); lut.G.push(c[1]); lut.B.push(c[2]); lut.A.push(255); lut.I.push(v);
    }
    return lut;
  }

  // Replace what `nv` shows by `layers`; a layer with `labels: n` is a label map (values 0..n).
  async function setLayers(nv, layers) {
    while (nv.volumes.length) nv.removeVolumeByIndex(0);
    for (const layer of layers) {
      const image = await nvlib.NVImage.loadFromBase64({
        base64: layer.base64, name: "volume" + nv.volumes.length + ".nii",
        colormap: layer.colormap || "gray", opacity: layer.opacity === undefined ? 1 : layer.opacity,
        cal_min: layer.calMin === undefined ? 0 : layer.calMin,
        cal_max: layer.calMax === undefined ? 255 : layer.calMax, trustCalMinMax: true,
      });
      if (layer.labels) image.setColormapLabel(labelColours(layer.labels));
      nv.addVolume(image);
    }
  }

  function setPlane(nv, plane) {
    const types = { axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
                    sagittal: nv.sliceTypeSagittal, multiplanar: nv.sliceTypeMultiplanar };
    nv.setSliceType(types[plane] === undefined ? nv.sliceTypeMultiplanar : types[plane]);
  }

  // Moving the cursor, scrolling or panning in one viewer moves all of them.
  function link(nvs) {
    if (nvs.length < 2) return;
    nvs.forEach((nv) => nv.broadcastTo(nvs.filter((other) => other !== nv), { "2d": true, "3d": true }));
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function slider(label, min, max, step, value, onInput) {
    const wrap = el("label", { class: "mv-control" }, label + " ");
    const input = el("input", { type: "range", min: String(min), max: String(max), step: String(step),
                                value: String(value) });
    input.addEventListener("input", () => onInput(Number(input.value)));
    wrap.appendChild(input);
    return { wrap, input };
  }

  // Plane, window/level and zoom widgets acting on every viewer in `nvs` (the image layer; the
  // volumes are uint8, 0..255). Returns a function that resets them.
  function controls(container, nvs, options) {
    const opts = Object.assign({ plane: "multiplanar" }, options || {});
    const bar = el("div", { class: "mv-controls" });
    const plane = el("select", { class: "mv-plane", "aria-label": "plane" });
    ["multiplanar", "axial", "coronal", "sagittal"].forEach((p) => plane.appendChild(el("option", { value: p }, p)));
    plane.value = opts.plane;
    plane.addEventListener("change", () => nvs.forEach((nv) => setPlane(nv, plane.value)));
    const wl = { level: 127.5, width: 255 };
    const applyWindow = () => nvs.forEach((nv) => {
      const image = nv.volumes[0];
      if (!image || image.colormap !== "gray") return;  // a label map shown alone keeps its colours
      image.cal_min = wl.level - wl.width / 2;
      image.cal_max = wl.level + wl.width / 2;
      nv.updateGLVolume();
    });
    const level = slider("level", 0, 255, 1, wl.level, (v) => { wl.level = v; applyWindow(); });
    const width = slider("width", 1, 255, 1, wl.width, (v) => { wl.width = v; applyWindow(); });
    const applyZoom = (z) => nvs.forEach((nv) => {
      const pan = nv.scene.pan2Dxyzmm;
      nv.setPan2Dxyzmm([pan[0], pan[1], pan[2], z]);
    });
    const zoom = slider("zoom", 1, 4, 0.25, 1, applyZoom);
    const reset = el("button", { type: "button", class: "mv-reset" }, "reset view");
    const doReset = () => {
      wl.level = 127.5; wl.width = 255; level.input.value = "127.5"; width.input.value = "255";
      zoom.input.value = "1"; plane.value = opts.plane;
      nvs.forEach((nv) => { nv.setPan2Dxyzmm([0, 0, 0, 1]); setPlane(nv, opts.plane); });
      applyWindow();
    };
    reset.addEventListener("click", doReset);
    const planeLabel = el("label", { class: "mv-control" }, "plane ");
    planeLabel.appendChild(plane);
    [planeLabel, level.wrap, width.wrap, zoom.wrap, reset].forEach((n) => bar.appendChild(n));
    container.appendChild(bar);
    return doReset;
  }

  // A row of canvases with linked cursors and shared controls; `rows` are the choices of a menu,
  // shown one at a time in the same canvases (more are added when a row has more panels; those
  // a row does not use are hidden).
  async function mountRows(root, rows) {
    const box = el("div", { class: "mv-row" });
    const heading = el("h3", {}, rows[0].title);
    box.appendChild(heading);
    const grid = el("div", { class: "mv-panels" });
    const nvs = [];
    const figures = [];
    async function show(row) {
      heading.textContent = row.title;
      grid.style.gridTemplateColumns = "repeat(" + row.panels.length + ", 1fr)";
      for (let i = 0; i < row.panels.length; i++) {
        const panel = row.panels[i];
        if (i < nvs.length) {
          figures[i].hidden = false;
          figures[i].querySelector("figcaption").textContent = panel.title;
          await setLayers(nvs[i], panel.layers);
          continue;
        }
        const fig = el("figure");
        fig.appendChild(el("figcaption", {}, panel.title));
        const holder = el("div", { class: "mv-canvas" });  // NiiVue sizes the canvas to its parent
        const canvas = el("canvas", { width: "400", height: "260" });
        holder.appendChild(canvas);
        fig.appendChild(holder);
        grid.appendChild(fig);
        figures.push(fig);
        nvs.push(await create(canvas, panel.layers, { sliceType: "axial" }));
      }
      figures.forEach((fig, i) => { fig.hidden = i >= row.panels.length; });
      link(nvs.slice(0, row.panels.length));
    }
    if (rows.length > 1) {
      const menu = el("select", { class: "mv-case", "aria-label": "case" });
      rows.forEach((r, i) => menu.appendChild(el("option", { value: String(i) }, r.title)));
      menu.addEventListener("change", async () => {
        delete root.dataset.ready;
        await show(rows[Number(menu.value)]);
        reset();
        root.dataset.ready = "1";
      });
      box.appendChild(menu);
    }
    box.appendChild(grid);
    root.appendChild(box);
    await show(rows[0]);
    const reset = controls(box, nvs, { plane: "axial" });
  }

  // The report viewer: {cases: [row], samples: row | null}, each row {title, panels: [{title, layers}]}.
  async function mountReport(root, data) {
    root.hidden = false;
    if (data.cases.length) await mountRows(root, data.cases);
    if (data.samples) await mountRows(root, [data.samples]);
    root.dataset.ready = "1";
  }

  window.MedlsdmViewer = { create, setLayers, link, controls, setPlane, mountReport, all };
})();
