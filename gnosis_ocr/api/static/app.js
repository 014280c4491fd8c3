"use strict";
// The whole client: upload, long-poll progress, render the markdown safely, copy it. No build step.

const $ = (id) => document.getElementById(id);
const FINAL = ["succeeded", "failed", "cancelled"];

function headers() {
  const key = $("key").value.trim();
  if (key) localStorage.setItem("gnosis-key", key);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error(body.error ? `${body.error.message} (${body.error.code})` : `HTTP ${response.status}`);
  return body;
}

function show(job) {
  $("job").hidden = false;
  $("status").textContent = job.status;
  $("status").className = `status ${job.status}`;
  $("progress").max = Math.max(job.pages_total, 1);
  $("progress").value = job.pages_done;
  $("pages").textContent = `${job.pages_done} of ${job.pages_total} page${job.pages_total === 1 ? "" : "s"} done`;
}

function fail(message) {
  $("job").hidden = false;
  $("error").hidden = false;
  $("error").textContent = message;
}

async function submit(file) {
  $("result").hidden = true;
  $("error").hidden = true;
  $("name").textContent = file.name;
  const form = new FormData();
  form.append("file", file);
  let job;
  try {
    job = await call("/v1/jobs", { method: "POST", body: form });
  } catch (err) {
    return fail(err.message);
  }
  show(job);
  try {
    while (!FINAL.includes(job.status)) {
      job = await call(`/v1/jobs/${job.id}?wait=2`); // long-poll: the server holds the request
      show(job);
    }
    if (job.status !== "succeeded") {
      return fail(job.error ? `${job.error.message} (${job.error.code})` : `The job was ${job.status}.`);
    }
    const markdown = await call(`/v1/jobs/${job.id}/result?format=markdown`);
    $("source").textContent = markdown;
    $("rendered").replaceChildren(render(markdown));
    $("result").hidden = false;
  } catch (err) {
    fail(err.message);
  }
}

// Markdown to HTML for what OCR produces: headings, paragraphs, lists, emphasis, code and the model's
// own HTML tables. The HTML is then rebuilt from an allow-list, so nothing in a document can run.
function toHtml(markdown) {
  const inline = (s) => s
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*]+)\*/g, "$1<em>$2</em>");
  const out = [];
  let list = null;
  for (const block of markdown.split(/\n{2,}/)) {
    const lines = block.split("\n");
    if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l))) {
      const tag = /^\s*\d+\./.test(lines[0]) ? "ol" : "ul";
      out.push(`<${tag}>${lines.map((l) => `<li>${inline(l.replace(/^\s*([-*]|\d+\.)\s+/, ""))}</li>`).join("")}</${tag}>`);
    } else if (/^#{1,6}\s/.test(block)) {
      const level = block.match(/^#+/)[0].length;
      out.push(`<h${level}>${inline(block.replace(/^#+\s*/, ""))}</h${level}>`);
    } else if (/^\s*<table/i.test(block)) {
      out.push(block);
    } else {
      out.push(`<p>${inline(block).replace(/\n/g, "<br>")}</p>`);
    }
  }
  return out.join("\n");
}

const ALLOWED = new Set(["P", "BR", "H1", "H2", "H3", "H4", "H5", "H6", "UL", "OL", "LI", "STRONG", "EM", "CODE",
  "TABLE", "THEAD", "TBODY", "TR", "TH", "TD"]);

function clean(node) {
  const fragment = document.createDocumentFragment();
  for (const child of node.childNodes) {
    if (child.nodeType === Node.TEXT_NODE) {
      fragment.append(document.createTextNode(child.textContent));
    } else if (child.nodeType === Node.ELEMENT_NODE && ALLOWED.has(child.tagName)) {
      const copy = document.createElement(child.tagName);
      for (const attr of ["colspan", "rowspan"]) if (child.hasAttribute(attr)) copy.setAttribute(attr, child.getAttribute(attr));
      copy.append(clean(child));
      fragment.append(copy);
    } else if (child.nodeType === Node.ELEMENT_NODE) {
      fragment.append(document.createTextNode(child.textContent)); // unknown tags keep their text only
    }
  }
  return fragment;
}

function render(markdown) {
  const parsed = new DOMParser().parseFromString(`<body>${toHtml(markdown)}</body>`, "text/html");
  return clean(parsed.body);
}

window.addEventListener("DOMContentLoaded", () => {
  $("key").value = localStorage.getItem("gnosis-key") || "";
  $("file").addEventListener("change", (e) => e.target.files[0] && submit(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) submit(e.dataTransfer.files[0]);
  });
  $("copy").addEventListener("click", async () => {
    await navigator.clipboard.writeText($("source").textContent);
    $("copied").hidden = false;
    setTimeout(() => { $("copied").hidden = true; }, 1500);
  });
  $("toggle").addEventListener("click", () => {
    const showSource = $("source").hidden;
    $("source").hidden = !showSource;
    $("rendered").hidden = showSource;
    $("toggle").textContent = showSource ? "Show rendered" : "Show source";
  });
});
