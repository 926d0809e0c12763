// The web chat page: keeps the conversation, sends it to /v1/chat/completions (streaming), shows TTFT stages.
"use strict";

const $ = (id) => document.getElementById(id);
const AFTER_TTFT = ["first_decode"];  // stages timed after the first token: not bars of TTFT
let model = null;
let messages = [];        // the OpenAI conversation so far
let pendingImage = null;  // a data: URL to attach to the next question

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = "model unknown";
    showError(e.message);
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// What the server reads (edgevlm.image.ACCEPTED_FORMATS), by the type the browser gives the file
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];

function showImage(url) {
  pendingImage = url;
  $("preview").src = url;
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
  $("clear-image").hidden = false;
}

// A picked or dropped file becomes the next question's image only if the browser can decode it as one; anything
// else says why, here, and leaves no image attached.
function setImage(file) {
  if (!file) return;
  const refuse = (why) => { clearImage(); showError(`${file.name}: ${why}`); };
  if (!IMAGE_TYPES.includes(file.type)) {
    refuse(`not an image this page can send (${file.type || "unknown type"}); pick a PNG, JPEG, WebP, GIF or BMP file`);
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => refuse("the file cannot be read");
  reader.onload = () => {
    const probe = new Image();
    probe.onload = () => { showError(""); showImage(reader.result); };
    probe.onerror = () => refuse(`cannot be read as an image (${file.type}); the file may be damaged`);
    probe.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  pendingImage = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("drop-hint").hidden = false;
  $("clear-image").hidden = true;
  $("file").value = "";
}

function addMessage(role, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "attached image";
    div.appendChild(img);
  }
  const p = document.createElement("p");
  p.textContent = text;
  div.appendChild(p);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return p;
}

function tokens(n) {
  return n === 1 ? "1 token" : `${n} tokens`;
}

function showStats(s, final) {
  $("ttft").textContent = (s.ttft_s * 1000).toFixed(1) + " ms";
  const total = Math.max(s.ttft_s, 1e-9);
  $("stages").replaceChildren(...Object.keys(s.stages).filter((k) => !AFTER_TTFT.includes(k)).map((k) => {
    const row = document.createElement("div");
    row.className = "stage";
    const bar = document.createElement("i");  // width set through the CSSOM: the page's CSP allows no inline styles
    bar.style.width = Math.min(100, (100 * s.stages[k]) / total).toFixed(1) + "%";
    const track = document.createElement("span");
    track.className = "bar";
    track.appendChild(bar);
    const name = document.createElement("span");
    name.textContent = k;
    const ms = document.createElement("span");
    ms.className = "ms";
    ms.textContent = (s.stages[k] * 1000).toFixed(1) + " ms";
    row.append(name, track, ms);
    return row;
  }));
  const figures = [
    ["prompt tokens prefilled", `${s.prefilled_tokens} of ${s.prompt_tokens}`],
    ["image cache hits", s.image_cache_hits + (s.image_cache_source ? ` (${s.image_cache_source})` : "")],
  ];
  if (s.prefix_cache_hit_tokens) {
    figures.push(["prefix KV cache", `${tokens(s.prefix_cache_hit_tokens)} (${s.prefix_cache_source})`]);
  }
  if (final) {
    if ("first_decode" in s.stages) figures.push(["first decode step", (s.stages.first_decode * 1000).toFixed(1) + " ms"]);
    figures.push(["generated", tokens(s.generated_tokens)], ["decode", s.decode_tps.toFixed(1) + " tok/s"]);
  }
  $("figures").replaceChildren(...figures.flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = String(v);
    return [dt, dd];
  }));
}

async function ask(question) {
  const image = pendingImage;
  const content = [{ type: "text", text: question }];
  if (image) content.unshift({ type: "image_url", image_url: { url: image } });
  const asked = addMessage("user", question, image);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const turn = { role: "user", content };
  clearImage();
  document.body.dataset.state = "streaming";
  showError("");
  $("send").disabled = true;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model, messages: messages.concat([turn]), stream: true,
        max_tokens: Number($("max-tokens").value) || 64, temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (choice && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
        }
        if (chunk.edgevlm) showStats(chunk.edgevlm, Boolean(choice && choice.finish_reason));
      }
    }
    messages.push(turn, { role: "assistant", content: answer });
  } catch (e) {
    // not part of the conversation: the question (and its image) go back into the form, to edit or send again
    showError(e.message);
    out.parentElement.remove();
    asked.parentElement.remove();
    if (!$("question").value) $("question").value = question;
    if (image && !pendingImage) showImage(image);
  } finally {
    out.parentElement.classList.remove("streaming");
    document.body.dataset.state = "idle";
    $("send").disabled = false;
  }
}

$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
$("clear-image").addEventListener("click", clearImage);
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  setImage(e.dataTransfer.files[0]);
});
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (!q || $("send").disabled) return;
  $("question").value = "";
  ask(q);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("reset").addEventListener("click", () => {
  messages = [];
  $("log").replaceChildren();
  clearImage();
  showError("");
});
$("api-key").addEventListener("change", loadModel);
loadModel();
