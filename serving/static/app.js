// The summarizer's page: stream summaries from /api/summarize (Server-Sent Events over a POST, read with
// fetch), one card per model, with the current token's likeliest alternatives as a bar chart.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_PROBS = 8;
const BOTH = "__all__";
let models = [];
let examples = [];
let running = [];  // AbortControllers of the streams in flight

// --- tabs

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
    if (tab.dataset.tab === "report") loadReport();
  });
}

// --- controls

function showSliderValues() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("top_k-value").textContent = $("top_k").value === "0" ? "off" : $("top_k").value;
  $("top_p-value").textContent = Number($("top_p").value).toFixed(2);
}
["temperature", "top_k", "top_p"].forEach((id) => $(id).addEventListener("input", showSliderValues));

async function loadModels() {
  const response = await fetch("/api/models");
  models = (await response.json()).models;
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    select.add(new Option(`${m.name} (${m.stage}, step ${m.step})`, m.name, m.default, m.default));
  }
  if (models.length > 1) select.add(new Option("all side by side", BOTH));
  tokenLimit();
}

// the token limit follows the chosen model's summary budget (the smallest one for side by side)
function tokenLimit() {
  const chosen = $("model").value === BOTH ? models : models.filter((m) => m.name === $("model").value);
  const budget = Math.min(...chosen.map((m) => m.max_new_tokens));
  $("max_new_tokens").max = budget;
  $("max_new_tokens").value = budget;
}
$("model").addEventListener("change", tokenLimit);

async function loadExamples() {
  const response = await fetch("/api/examples");
  examples = (await response.json()).examples;
  examples.forEach((e, i) => $("example").add(new Option(`${e.subreddit ? "r/" + e.subreddit + ": " : ""}${e.title || e.post.slice(0, 60)}`, i)));
}

$("example").addEventListener("change", () => {
  const e = examples[$("example").value];
  if (!e) return;
  $("subreddit").value = e.subreddit;
  $("title").value = e.title;
  $("post").value = e.post;
});

// --- streaming

function request(model) {
  const body = {
    post: $("post").value, title: $("title").value, subreddit: $("subreddit").value, model,
    temperature: Number($("temperature").value), top_k: Number($("top_k").value), top_p: Number($("top_p").value),
    top_probs: TOP_PROBS, stream: true,
  };
  if ($("max_new_tokens").value) body.max_new_tokens = Number($("max_new_tokens").value);
  if ($("seed").value) body.seed = Number($("seed").value);
  return body;
}

// Server-Sent Events from a fetch body: events are separated by a blank line, each "data: <json>".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function drawChart(chart, top, chosen) {
  chart.innerHTML = "";
  for (const t of top) {
    const bar = document.createElement("div");
    bar.className = "bar" + (t.id === chosen ? " chosen" : "");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = JSON.stringify(t.token).slice(1, -1);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * t.prob).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * t.prob).toFixed(1)}%`;
    bar.append(label, track, value);
    chart.append(bar);
  }
}

async function streamInto(card, model) {
  const controller = new AbortController();
  running.push(controller);
  const summary = card.querySelector(".summary"), meta = card.querySelector(".meta"), chart = card.querySelector(".chart");
  card.dataset.state = "streaming";
  try {
    const response = await fetch("/api/summarize", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request(model)), signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(error.error.message);
    }
    for await (const event of events(response)) {
      if (event.type === "token") {
        summary.textContent += event.text;
        meta.textContent = `${event.index + 1} tokens · ${event.tokens_per_s.toFixed(1)} tokens/s`;
        if (event.top.length) drawChart(chart, event.top, event.id);
      } else if (event.type === "done") {
        summary.textContent = event.summary;
        meta.textContent = `${event.tokens} tokens in ${event.seconds.toFixed(2)} s · ${event.tokens_per_s.toFixed(1)} tokens/s` +
          (event.finish_reason === "length" ? " · cut at the token limit" : "") +
          (event.truncated ? " · the post was cut to fit the prompt" : "");
        card.dataset.state = "done";
      } else if (event.type === "error") {
        throw new Error(event.error.message);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      card.dataset.state = "stopped";
      meta.textContent += " · stopped";
    } else {
      card.dataset.state = "error";
      $("message").textContent = e.message;
    }
  } finally {
    running = running.filter((c) => c !== controller);
    if (!running.length) { $("summarize").disabled = false; $("stop").disabled = true; }
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  $("message").textContent = "";
  if (!$("post").value.trim()) { $("message").textContent = "Paste a post first."; return; }
  const chosen = $("model").value === BOTH ? models.map((m) => m.name) : [$("model").value];
  const outputs = $("outputs");
  outputs.innerHTML = "";
  $("summarize").disabled = true;
  $("stop").disabled = false;
  for (const name of chosen) {
    const card = $("card-template").content.firstElementChild.cloneNode(true);
    card.dataset.model = name;
    const m = models.find((x) => x.name === name);
    card.querySelector(".card-title").textContent = `${name} · ${m.stage}, step ${m.step}`;
    outputs.append(card);
    streamInto(card, name);
  }
});

$("stop").addEventListener("click", () => running.forEach((c) => c.abort()));

// --- report tab: the run's report.md (a small markdown subset: headings, tables, lists, paragraphs) and plots

function inline(text) {
  const escaped = text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return escaped.replace(/`([^`]+)`/g, "<code>$1</code>").replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
}

function renderMarkdown(md) {
  const lines = md.split("\n"), html = [];
  let i = 0;
  const cells = (line) => line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
  while (i < lines.length) {
    const line = lines[i];
    if (/^#{1,6} /.test(line)) {
      const level = line.match(/^#+/)[0].length;
      html.push(`<h${level + 1}>${inline(line.slice(level + 1))}</h${level + 1}>`); i++;
    } else if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?\s*:?-{3,}/.test(lines[i + 1])) {
      const head = cells(line); i += 2;
      const rows = [];
      while (i < lines.length && lines[i].trim().startsWith("|")) rows.push(cells(lines[i++]));
      html.push("<table><thead><tr>" + head.map((c) => `<th>${inline(c)}</th>`).join("") + "</tr></thead><tbody>" +
        rows.map((r) => "<tr>" + r.map((c) => `<td>${inline(c)}</td>`).join("") + "</tr>").join("") + "</tbody></table>");
    } else if (/^\s*[-*] /.test(line)) {
      const items = [];
      while (i < lines.length && /^\s*[-*] /.test(lines[i])) items.push(lines[i++].replace(/^\s*[-*] /, ""));
      html.push("<ul>" + items.map((t) => `<li>${inline(t)}</li>`).join("") + "</ul>");
    } else if (line.trim()) {
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^(#|\s*\||\s*[-*] )/.test(lines[i])) para.push(lines[i++]);
      html.push(`<p>${inline(para.join(" "))}</p>`);
    } else {
      i++;
    }
  }
  return html.join("\n");
}

async function loadReport() {
  const report = await (await fetch("/api/report")).json();
  $("report-run").textContent = `Run folder: ${report.run}`;
  $("report-body").innerHTML = report.markdown ? renderMarkdown(report.markdown)
    : "<p>No report yet: run.sh writes report.md and the plots at the end of a run (make demo).</p>";
  $("report-plots").innerHTML = "";
  for (const src of report.plots) {  // each plot as wide as the page, a click opens it at full size
    const link = document.createElement("a");
    link.href = src;
    link.target = "_blank";
    link.rel = "noopener";
    link.title = "open the full-size image";
    const img = document.createElement("img");
    img.src = src;
    img.alt = src.split("/").pop();
    link.append(img);
    $("report-plots").append(link);
  }
}

loadModels().catch((e) => { $("message").textContent = `cannot list the models: ${e.message}`; });
loadExamples().catch(() => {});
showSliderValues();
