// drover dashboard: the live parts. Served as a file (the Content-Security-Policy allows no
// inline script). Only textContent is ever set, so nothing a producer wrote becomes markup.
"use strict";

function liveJob() {
  const job = document.getElementById("job");
  if (!job || job.dataset.terminal === "true" || !window.EventSource) {
    return;
  }
  const status = document.getElementById("live-status");
  const source = new EventSource(job.dataset.events);
  source.addEventListener("open", () => {
    status.textContent = "live: updates as the job runs";
  });
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    for (const el of job.querySelectorAll("[data-field]")) {
      const name = el.dataset.field;
      if (!(name in p)) {
        continue;
      }
      const v = p[name];
      el.textContent = v === null || v === undefined ? (name === "batches_total" ? "?" : "—") : String(v);
      if (name === "state") {
        el.className = "state state-" + v;
      }
    }
    const bar = document.getElementById("job-progress");
    if (bar) {
      bar.max = p.batches_total || 1;
      bar.value = p.batches_done;
    }
    if (p.terminal) {
      source.close();
      status.textContent = "finished: reloading for the result";
      // The full page shows the result, manifest and attempts.
      window.setTimeout(() => window.location.reload(), 500);
    }
  });
  source.addEventListener("error", () => {
    status.textContent = "live updates paused: reconnecting";
  });
}

document.addEventListener("DOMContentLoaded", liveJob);
