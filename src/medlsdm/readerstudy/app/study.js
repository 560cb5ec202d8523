// The reader-study page: shows one volume at a time, records the answers in localStorage (per
// study and reader, so a reload or a closed tab loses nothing) and exports them as JSON or CSV.
(function () {
  "use strict";
  const STUDY = JSON.parse(document.getElementById("study-data").textContent);
  const PREFIX = "medlsdm-reader-study:" + STUDY.study_id + ":";
  const $ = (id) => document.getElementById(id);
  const state = { reader: null, index: 0, answers: {} };
  let nv = null;
  let resetView = null;

  // ------------------------------------------------------------------ storage
  function save() {
    localStorage.setItem(PREFIX + "reader", state.reader);
    localStorage.setItem(PREFIX + "answers:" + state.reader,
                         JSON.stringify({ index: state.index, answers: state.answers }));
  }
  function restore(reader) {
    state.reader = reader;
    const saved = JSON.parse(localStorage.getItem(PREFIX + "answers:" + reader) || "null");
    state.answers = saved ? saved.answers : {};
    state.index = saved ? Math.min(saved.index, STUDY.items.length - 1) : 0;
  }

  // ------------------------------------------------------------------ questions
  function questions() {
    const qs = STUDY.categories.map((c) => ({ id: c.id, question: c.question,
      options: c.options.map((text, i) => ({ value: i + 1, text: (i + 1) + " – " + text })) }));
    if (STUDY.turing) {
      qs.push({ id: "turing", question: "Is this volume real or synthetic?",
                options: [{ value: "real", text: "Real" }, { value: "synthetic", text: "Synthetic" }] });
      qs.push({ id: "confidence", question: "How sure are you?",
                options: STUDY.turing_confidence.map((text, i) => ({ value: i + 1, text: text })) });
    }
    return qs;
  }
  const QUESTIONS = questions();

  function buildForm() {
    const form = $("questions");
    QUESTIONS.forEach((q) => {
      const set = document.createElement("fieldset");
      const legend = document.createElement("legend");
      legend.textContent = q.question;
      set.appendChild(legend);
      q.options.forEach((o) => {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "radio"; input.name = q.id; input.value = String(o.value);
        input.addEventListener("change", () => record(q.id, o.value));
        label.appendChild(input);
        label.appendChild(document.createTextNode(" " + o.text));
        set.appendChild(label);
      });
      form.appendChild(set);
    });
  }

  function record(question, value) {
    const id = STUDY.items[state.index].id;
    const answer = state.answers[id] || {};
    answer[question] = value;
    state.answers[id] = answer;
    save();
    updateStatus();
  }

  const complete = (id) => QUESTIONS.every((q) => state.answers[id] && state.answers[id][q.id] !== undefined);

  function fillForm() {
    const answer = state.answers[STUDY.items[state.index].id] || {};
    QUESTIONS.forEach((q) => {
      document.querySelectorAll('input[name="' + q.id + '"]').forEach((input) => {
        input.checked = answer[q.id] !== undefined && String(answer[q.id]) === input.value;
      });
    });
  }

  function updateStatus() {
    const done = STUDY.items.filter((item) => complete(item.id)).length;
    $("progress").textContent = done + " of " + STUDY.items.length + " volumes answered";
    $("reader-label").textContent = "Reader: " + state.reader + " ·";
    const missing = STUDY.items.length - done;
    $("incomplete").hidden = missing === 0;
    $("incomplete").textContent = missing + " volume(s) still need answers before you export.";
    Array.from($("jump").options).forEach((opt, i) => {
      opt.textContent = "Volume " + (i + 1) + (complete(STUDY.items[i].id) ? " ✓" : "");
    });
  }

  // ------------------------------------------------------------------ volumes
  const waiting = {};
  window.medlsdmVolume = function (id, base64) {
    if (waiting[id]) { waiting[id](base64); delete waiting[id]; }
  };
  function loadVolume(id) {
    return new Promise((resolve, reject) => {
      waiting[id] = resolve;
      const script = document.createElement("script");
      script.src = "volumes/" + id + ".js";
      script.onerror = () => reject(new Error("cannot load volume " + id));
      script.onload = () => script.remove();
      document.body.appendChild(script);
    });
  }

  async function show(index) {
    state.index = Math.max(0, Math.min(STUDY.items.length - 1, index));
    save();
    const item = STUDY.items[state.index];
    $("item-title").textContent = "Volume " + (state.index + 1) + " of " + STUDY.items.length;
    $("jump").value = String(state.index);
    $("prev").disabled = state.index === 0;
    $("next").disabled = state.index === STUDY.items.length - 1;
    fillForm();
    updateStatus();
    document.body.dataset.loading = "1";
    const base64 = await loadVolume(item.id);
    const layers = [{ base64: base64 }];
    if (!nv) {
      nv = await MedlsdmViewer.create($("viewer"), layers);
      resetView = MedlsdmViewer.controls($("controls"), [nv]);
    } else {
      await MedlsdmViewer.setLayers(nv, layers);
      resetView();
    }
    delete document.body.dataset.loading;
  }

  // ------------------------------------------------------------------ export
  function rows() {
    return STUDY.items.filter((item) => state.answers[item.id]).map((item) => {
      const row = { item: item.id };
      QUESTIONS.forEach((q) => { if (state.answers[item.id][q.id] !== undefined) row[q.id] = state.answers[item.id][q.id]; });
      return row;
    });
  }
  function download(name, text, type) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type: type }));
    link.download = name;
    document.body.appendChild(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  }
  const fileStem = () => "answers-" + state.reader.replace(/[^A-Za-z0-9_-]+/g, "_") + "-" + STUDY.study_id;
  function exportJson() {
    const data = { format: "medlsdm-reader-study-answers", version: 1, study_id: STUDY.study_id,
                   reader: state.reader, exported: new Date().toISOString(), answers: rows() };
    download(fileStem() + ".json", JSON.stringify(data, null, 2) + "\n", "application/json");
  }
  function exportCsv() {
    const cols = ["study_id", "reader", "item"].concat(QUESTIONS.map((q) => q.id));
    const quote = (v) => { const s = v === undefined ? "" : String(v);
                           return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; };
    const lines = [cols.join(",")].concat(rows().map((r) =>
      cols.map((c) => quote(c === "study_id" ? STUDY.study_id : c === "reader" ? state.reader : r[c])).join(",")));
    download(fileStem() + ".csv", lines.join("\n") + "\n", "text/csv");
  }

  // ------------------------------------------------------------------ start
  function begin(reader) {
    restore(reader);
    save();
    $("start").hidden = true;
    $("study").hidden = false;
    show(state.index);
  }
  function init() {
    buildForm();
    STUDY.items.forEach((item, i) => {
      const opt = document.createElement("option");
      opt.value = String(i);
      $("jump").appendChild(opt);
    });
    $("prev").addEventListener("click", () => show(state.index - 1));
    $("next").addEventListener("click", () => show(state.index + 1));
    $("jump").addEventListener("change", () => show(Number($("jump").value)));
    $("export-json").addEventListener("click", exportJson);
    $("export-csv").addEventListener("click", exportCsv);
    $("switch-reader").addEventListener("click", () => {
      localStorage.removeItem(PREFIX + "reader");
      $("study").hidden = true; $("start").hidden = false; $("reader").value = "";
    });
    $("begin").addEventListener("click", () => {
      const name = $("reader").value.trim();
      if (name) begin(name); else $("reader").focus();
    });
    const last = localStorage.getItem(PREFIX + "reader");
    if (last) begin(last); else $("start").hidden = false;
  }
  init();
})();
