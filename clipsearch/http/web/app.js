// clipsearch page: text (vector or hybrid, dates read), image, more-like-this and weighted-terms queries, and
// the duplicates, against the REST API of the same origin.
"use strict";

(() => {
  const DEBOUNCE_MS = 250;
  const SENT_AS_IS = ["image/jpeg", "image/png", "image/webp"];
  // Formats the server decodes that most browsers cannot (HEIC outside Safari) or may not name: a file
  // the browser cannot draw goes up as it is, typed by its extension when the browser gives no type.
  const SERVER_DECODES = { heic: "image/heic", heif: "image/heif", avif: "image/avif" };
  // CLIP sees a few hundred pixels: the server keeps at most 2:1 around the centre and 448 px on the
  // shorter side. Shrinking to that here keeps a camera original far under API Gateway's 6 MB event
  // limit (base64 included, so ~4.4 MB of picture) and makes the upload small on every path.
  const MAX_SIDE = 448;
  const MAX_ASPECT = 2;
  const JPEG_QUALITY = 0.92;
  const MAX_TERMS = 10; // the API's limit on weighted terms

  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const input = $("q");
  const kSelect = $("k");
  const fileInput = $("file");
  const drop = $("drop");
  const results = $("results");
  const statusLine = $("status");
  const errorLine = $("error");
  const queryImage = $("query-image");
  const queryThumb = $("query-thumb");
  const queryCaption = $("query-caption");
  const hybridBox = $("hybrid");
  const noDatesBox = $("no-dates");
  const understood = $("understood");
  const duplicatesView = $("duplicates");
  const duplicatesStatus = $("duplicates-status");
  const groupsList = $("groups");
  const moreButton = $("duplicates-more");

  // The query being shown, so changing k re-runs it: {type: "text", text} | {type: "image", blob, name}
  // | {type: "id", id, title} | {type: "terms", terms: [{term, label}]}, term as the API's query terms.
  let current = null;
  let inflight = null;
  let sequence = 0;
  let debounce = 0;
  let thumbUrl = null;

  function k() {
    return Number(kSelect.value) || 10;
  }

  function showError(message) {
    errorLine.textContent = message;
    errorLine.hidden = !message;
  }

  function setBusy(busy) {
    results.setAttribute("aria-busy", busy ? "true" : "false");
    document.body.classList.toggle("busy", busy);
  }

  async function run(query) {
    current = query;
    if (inflight) inflight.abort();
    const controller = new AbortController();
    inflight = controller;
    const mine = ++sequence;
    hideDuplicates();
    let url = "/search";
    const init = { method: "POST", signal: controller.signal, headers: {} };
    if (query.type === "text") {
      const params = new URLSearchParams({ q: query.text, k: String(k()) });
      // Hybrid is for text only: the API refuses it with a picture, an id or query terms.
      if (hybridBox.checked) params.set("mode", "hybrid");
      if (noDatesBox.checked) params.set("dates", "false");
      url = `/search?${params}`;
      init.method = "GET";
    } else if (query.type === "image") {
      url = `/search?${new URLSearchParams({ k: String(k()) })}`;
      init.headers["Content-Type"] = query.blob.type;
      init.body = query.blob;
    } else if (query.type === "terms") {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify({ query: query.terms.map((t) => t.term), k: k() });
    } else {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify({ id: query.id, k: k() });
    }
    setBusy(true);
    try {
      const response = await fetch(url, init);
      const body = await response.json().catch(() => null);
      if (mine !== sequence) return;
      if (!response.ok) {
        const message = body && body.error ? body.error.message : `the server answered ${response.status}`;
        throw new Error(message);
      }
      showError("");
      render(body, query);
    } catch (err) {
      if (err.name === "AbortError" || mine !== sequence) return;
      showError(`Search failed: ${err.message}`);
      statusLine.textContent = "";
      showUnderstood(null);
    } finally {
      if (mine === sequence) {
        setBusy(false);
        inflight = null;
      }
    }
  }

  function describe(query) {
    if (query.type === "text") return `\u201c${query.text}\u201d`;
    if (query.type === "image") return `the picture ${query.name}`;
    if (query.type === "terms") {
      return query.terms
        .map((t, i) => `${t.term.weight < 0 ? "\u2212 " : i ? "+ " : ""}${t.label}`)
        .join(" ");
    }
    return `pictures like \u201c${query.title}\u201d`;
  }

  // -- weighted terms: add a result to the current query, or subtract it ----------------------

  async function base64Of(blob) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    }
    return btoa(binary);
  }

  // The current query as a list of terms, each with the label the status line shows.
  async function termsOf(query) {
    if (query.type === "terms") return query.terms;
    if (query.type === "text") return [{ term: { text: query.text }, label: `\u201c${query.text}\u201d` }];
    if (query.type === "id") return [{ term: { id: query.id }, label: `\u201c${query.title}\u201d` }];
    return [{ term: { image: await base64Of(query.blob) }, label: `the picture ${query.name}` }];
  }

  async function combine(hit, title, weight) {
    if (!current) return;
    const terms = await termsOf(current);
    if (terms.length >= MAX_TERMS) {
      showError(`A query holds at most ${MAX_TERMS} terms; start a new search to add more.`);
      return;
    }
    run({ type: "terms", terms: [...terms, { term: { id: hit.id, weight }, label: `\u201c${title}\u201d` }] });
  }

  // What a text query's date words became: the text CLIP read and the capture-time filter.
  function showUnderstood(shown) {
    const filter = shown && shown.filter;
    if (!shown || shown.search_text === undefined || !filter) {
      understood.hidden = true;
      understood.textContent = "";
      return;
    }
    const day = (value) => value.replace("T", " ");
    let taken = "";
    if (filter.taken_after && filter.taken_before) {
      taken = `taken ${day(filter.taken_after)} to ${day(filter.taken_before)}`;
    } else if (filter.taken_after) {
      taken = `taken from ${day(filter.taken_after)}`;
    } else if (filter.taken_before) {
      taken = `taken before ${day(filter.taken_before)}`;
    }
    understood.textContent = `Searching \u201c${shown.search_text}\u201d ${taken}`.trim();
    understood.hidden = false;
  }

  function render(body, query) {
    results.replaceChildren();
    showUnderstood(body.query);
    const hits = body.hits || [];
    if (!hits.length) {
      statusLine.textContent = `No results for ${describe(query)}.`;
      return;
    }
    statusLine.textContent =
      `${hits.length} result${hits.length === 1 ? "" : "s"} for ${describe(query)} ` +
      `in ${Number(body.took_ms).toFixed(1)} ms \u00b7 model ${body.model}`;
    hits.forEach((hit, i) => results.append(card(hit, i + 1)));
  }

  function titleOf(hit) {
    return hit.title || hit.key.split(/[\\/]/).pop();
  }

  function card(hit, rank) {
    const item = document.createElement("li");
    item.className = "hit";
    item.dataset.id = hit.id;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit-button";
    const title = titleOf(hit);
    button.setAttribute("aria-label", `${rank}. ${title}, score ${hit.score.toFixed(3)}: more like this`);
    button.title = "More like this";

    const img = document.createElement("img");
    img.className = "hit-thumb";
    img.loading = "lazy";
    img.alt = title;
    img.src = hit.url;
    img.addEventListener("error", () => img.classList.add("broken"), { once: true });

    const caption = document.createElement("span");
    caption.className = "hit-text";
    const name = document.createElement("span");
    name.className = "hit-title";
    name.textContent = title;
    const score = document.createElement("span");
    score.className = "hit-score";
    score.textContent = hit.score.toFixed(3);
    score.title = "cosine similarity";
    const bar = document.createElement("span");
    bar.className = "hit-bar";
    bar.setAttribute("aria-hidden", "true");
    bar.style.setProperty("--score", String(Math.max(0, Math.min(1, hit.score))));
    caption.append(name, bar, score);
    if (hit.taken_at) {
      // The capture time as the camera's clock read it, to the minute.
      const taken = document.createElement("time");
      taken.className = "hit-taken";
      taken.dateTime = hit.taken_at;
      taken.textContent = hit.taken_at.slice(0, 16).replace("T", " ");
      caption.append(taken);
    }

    button.append(img, caption);
    button.addEventListener("click", () => {
      clearImageQuery();
      run({ type: "id", id: hit.id, title });
    });

    const path = document.createElement("span");
    path.className = "hit-path";
    const pathText = document.createElement("bdi");
    pathText.textContent = hit.key;
    path.append(pathText);
    // The capture time (wall clock, with the camera's UTC offset when known) in the path's tooltip.
    path.title = hit.taken_at ? `${hit.key}\ntaken ${hit.taken_at.replace("T", " ")}` : hit.key;

    const actions = document.createElement("span");
    actions.className = "hit-actions";
    for (const [sign, weight, verb] of [["+", 1, "Add"], ["\u2212", -1, "Subtract"]]) {
      const change = document.createElement("button");
      change.type = "button";
      change.className = weight > 0 ? "hit-add" : "hit-subtract";
      change.textContent = sign;
      change.title = `${verb} this picture ${weight > 0 ? "to" : "from"} the query`;
      change.setAttribute("aria-label", `${verb} ${title} ${weight > 0 ? "to" : "from"} the query`);
      change.addEventListener("click", () => combine(hit, title, weight));
      actions.append(change);
    }

    item.append(button, actions, path);
    return item;
  }

  // -- text -----------------------------------------------------------------------------------

  function textQuery(now) {
    clearTimeout(debounce);
    const text = input.value.trim();
    if (!text) {
      if (current && current.type === "text") clearResults();
      return;
    }
    const go = () => {
      clearImageQuery();
      run({ type: "text", text });
    };
    if (now) go();
    else debounce = setTimeout(go, DEBOUNCE_MS);
  }

  function clearResults() {
    if (inflight) inflight.abort();
    sequence++;
    current = null;
    results.replaceChildren();
    showUnderstood(null);
    statusLine.textContent = "";
    showError("");
    setBusy(false);
  }

  input.addEventListener("input", () => textQuery(false));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    textQuery(true);
  });
  kSelect.addEventListener("change", () => {
    if (current) run(current);
  });
  for (const box of [hybridBox, noDatesBox]) {
    box.addEventListener("change", () => {
      if (current && current.type === "text") run(current);
    });
  }

  // -- duplicates -----------------------------------------------------------------------------

  const DUPLICATE_GROUPS = 50; // groups per page
  let duplicatesFrom = null; // `from` of the next page, null when there is none
  let duplicatesRequest = null;

  async function loadDuplicates(from) {
    if (duplicatesRequest) duplicatesRequest.abort();
    const controller = new AbortController();
    duplicatesRequest = controller;
    const params = new URLSearchParams({ kind: "all", limit: String(DUPLICATE_GROUPS) });
    if (from) params.set("from", String(from));
    moreButton.disabled = true;
    try {
      const response = await fetch(`/duplicates?${params}`, { signal: controller.signal });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        throw new Error(body && body.error ? body.error.message : `the server answered ${response.status}`);
      }
      if (!from) groupsList.replaceChildren();
      body.groups.forEach((group) => groupsList.append(groupItem(group)));
      const shown = groupsList.children.length;
      duplicatesStatus.textContent = shown
        ? `${shown} group${shown === 1 ? "" : "s"} of duplicates${body.next_from ? " so far" : ""}`
        : "No duplicates found.";
      duplicatesFrom = body.next_from || null;
      moreButton.hidden = !duplicatesFrom;
      showError("");
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(`Duplicates failed: ${err.message}`);
    } finally {
      if (duplicatesRequest === controller) duplicatesRequest = null;
      moreButton.disabled = false;
    }
  }

  function groupItem(group) {
    const item = document.createElement("li");
    item.className = "group";
    const head = document.createElement("p");
    head.className = "group-head";
    const kind = group.kind === "exact" ? "exact copies" : "near duplicates";
    head.textContent = `${kind} \u00b7 ${group.count} pictures`;
    const list = document.createElement("ul");
    list.className = "group-hits";
    for (const hit of group.hits) {
      const entry = document.createElement("li");
      entry.className = "group-hit";
      entry.dataset.id = hit.id;
      const title = titleOf(hit);
      const img = document.createElement("img");
      img.className = "group-thumb";
      img.loading = "lazy";
      img.alt = title;
      img.src = hit.url;
      img.title = hit.key;
      img.addEventListener("error", () => img.classList.add("broken"), { once: true });
      const name = document.createElement("span");
      name.className = "group-title";
      name.textContent = title;
      entry.append(img, name);
      list.append(entry);
    }
    item.append(head, list);
    return item;
  }

  function hideDuplicates() {
    if (duplicatesRequest) duplicatesRequest.abort();
    duplicatesView.hidden = true;
  }

  $("show-duplicates").addEventListener("click", () => {
    clearTimeout(debounce);
    input.value = "";
    clearImageQuery();
    clearResults();
    duplicatesView.hidden = false;
    groupsList.replaceChildren();
    moreButton.hidden = true;
    duplicatesStatus.textContent = "Looking for duplicates\u2026";
    loadDuplicates(0);
  });
  moreButton.addEventListener("click", () => {
    if (duplicatesFrom) loadDuplicates(duplicatesFrom);
  });

  // -- image ----------------------------------------------------------------------------------

  async function asUploadable(file) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file); // upright: EXIF orientation applied
    } catch (err) {
      // A format the server reads travels as it is, so a broken file gets the server's reason.
      if (SENT_AS_IS.includes(file.type)) return file;
      const type = serverDecodes(file);
      if (type) return file.type === type ? file : new Blob([file], { type });
      throw err;
    }
    const { width, height } = bitmap;
    const short = Math.min(width, height);
    const small = short <= MAX_SIDE && Math.max(width, height) <= MAX_ASPECT * short;
    if (small && SENT_AS_IS.includes(file.type)) {
      bitmap.close();
      return file;
    }
    // The centre at most 2:1, shorter side at most MAX_SIDE: what the server would keep anyway.
    const cropWidth = Math.min(width, MAX_ASPECT * height);
    const cropHeight = Math.min(height, MAX_ASPECT * width);
    const scale = Math.min(1, MAX_SIDE / Math.min(cropWidth, cropHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(cropWidth * scale));
    canvas.height = Math.max(1, Math.round(cropHeight * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff"; // transparency on white, as the server composites it
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, (width - cropWidth) / 2, (height - cropHeight) / 2, cropWidth, cropHeight,
      0, 0, canvas.width, canvas.height);
    bitmap.close();
    // Small pictures in other formats (GIF, BMP, HEIC where the browser decodes it) stay lossless.
    const type = small ? "image/png" : "image/jpeg";
    return new Promise((resolve, reject) =>
      canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("cannot read that picture"))),
        type, JPEG_QUALITY));
  }

  function serverDecodes(file) {
    const byType = Object.values(SERVER_DECODES).find((t) => t === file.type);
    const ext = (file.name || "").split(".").pop().toLowerCase();
    return byType || SERVER_DECODES[ext] || null;
  }

  async function imageQuery(file) {
    if (!file) return;
    if (!file.type.startsWith("image/") && !serverDecodes(file)) {
      showError(`${file.name || "That file"} is not an image.`);
      return;
    }
    let blob;
    try {
      blob = await asUploadable(file);
    } catch (err) {
      showError(`Cannot read ${file.name || "that picture"}: ${err.message || err}`);
      return;
    }
    clearTimeout(debounce);
    input.value = "";
    if (thumbUrl) URL.revokeObjectURL(thumbUrl);
    thumbUrl = URL.createObjectURL(blob);
    queryThumb.src = thumbUrl;
    queryCaption.textContent = file.name || "pasted picture";
    queryImage.hidden = false;
    run({ type: "image", blob, name: file.name || "pasted picture" });
  }

  function clearImageQuery() {
    queryImage.hidden = true;
    fileInput.value = "";
  }

  fileInput.addEventListener("change", () => imageQuery(fileInput.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    document.addEventListener(type, (event) => {
      if (!event.relatedTarget) drop.classList.remove("dragging");
    });
  }
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    imageQuery(file);
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])].find((f) =>
      f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      imageQuery(file);
    }
  });

  // -- keyboard -------------------------------------------------------------------------------

  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing) {
      event.preventDefault();
      input.focus();
      input.select();
    } else if (event.key === "Escape") {
      input.value = "";
      clearImageQuery();
      clearResults();
      hideDuplicates();
      input.focus();
    }
  });

  // -- start ----------------------------------------------------------------------------------

  fetch("/health")
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`health answered ${r.status}`))))
    .then((h) => {
      $("health").textContent = `${h.count.toLocaleString()} pictures \u00b7 model ${h.model}`;
    })
    .catch((err) => {
      $("health").textContent = "server unreachable";
      showError(`Cannot reach the search server: ${err.message}`);
    });

  const initial = new URLSearchParams(location.search).get("q");
  if (initial) {
    input.value = initial;
    textQuery(true);
  }
})();
