"use strict";

// Waits for the image, fetches JSON from the origin, and writes what it learnt into the DOM
// (#result holds one JSON object; the test reads it from chromium --dump-dom).
async function main() {
  const result = document.getElementById("result");
  const pixel = document.getElementById("pixel");
  if (!pixel.complete) {
    await new Promise((resolve) => {
      pixel.addEventListener("load", resolve);
      pixel.addEventListener("error", resolve);
    });
  }
  const report = {
    css_color: getComputedStyle(document.getElementById("title")).color,
    image_width: pixel.naturalWidth,
  };
  try {
    const response = await fetch("/echo/from-script?n=1", { headers: { "X-From-Page": "app.js" } });
    report.fetch_status = response.status;
    report.echo = await response.json();
  } catch (error) {
    report.error = String(error);
  }
  result.textContent = JSON.stringify(report);
  result.dataset.done = "yes";
}

main();
