// Upscale an image, and describe one (interrogate) with a caption that can become the prompt.

import { $, acceptImages, fillSelect, numberOf, readDataUrl, say } from "../dom.js";
import { TaskPanel } from "../task-panel.js";

/** A file input (with drop) whose image is kept as a data: URL and shown in ``preview``. */
function imagePicker(zone, input, preview, error) {
  const picked = { dataUrl: null };
  acceptImages(zone, input, async (file) => {
    try {
      picked.dataUrl = await readDataUrl(file);
      preview.src = picked.dataUrl;
      preview.hidden = false;
      say(error, "");
    } catch (err) {
      say(error, err.message);
    }
  });
  return picked;
}

export function setupTools(app) {
  const upscaleError = $("#upscale-error");
  const upscaleImage = imagePicker(
    $("#upscale-drop"),
    $("#upscale-image"),
    $("#upscale-source"),
    upscaleError,
  );
  const upscalePanel = new TaskPanel(
    $("#upscale-task"),
    app.api,
    {
      onUseImage: (dataUrl) => app.views.create.useImage(dataUrl),
    },
    "Upscale",
  );

  const askError = $("#interrogate-error");
  const askImage = imagePicker(
    $("#interrogate-drop"),
    $("#interrogate-image"),
    $("#interrogate-source"),
    askError,
  );
  const askPanel = new TaskPanel($("#interrogate-task"), app.api, {}, "Interrogate");

  async function upscale(event) {
    event.preventDefault();
    if (!upscaleImage.dataUrl) return say(upscaleError, "Choose an image to upscale first.");
    say(upscaleError, "");
    const second = $("#upscale-upscaler2").value;
    const body = {
      image: upscaleImage.dataUrl,
      upscalingRate: numberOf($("#upscale-rate")),
      upscaler: $("#upscale-upscaler").value,
      upscaler2: second || undefined,
      upscaler2_factor: second ? numberOf($("#upscale-factor"), 0) : 0,
    };
    await upscalePanel.run(() => app.api.post("/api/sd/upscale/async", body));
  }

  async function interrogate(event) {
    event.preventDefault();
    if (!askImage.dataUrl) return say(askError, "Choose an image to describe first.");
    say(askError, "");
    $("#caption-box").hidden = true;
    const body = { image: askImage.dataUrl, model: $("#interrogate-model").value };
    const data = await askPanel.run(() => app.api.post("/api/sd/interrogate/async", body));
    if (data && data.caption !== undefined) {
      $("#caption").value = data.caption;
      $("#caption-box").hidden = false;
    }
  }

  async function loadUpscalers() {
    try {
      const upscalers = (await app.models()).Upscalers || [];
      fillSelect(
        $("#upscale-upscaler"),
        upscalers.map((u) => [u, u]),
      );
      fillSelect($("#upscale-upscaler2"), [["", "None"], ...upscalers.map((u) => [u, u])]);
    } catch {
      // the Create view already said that the models could not be listed
    }
  }

  $("#upscale-form").addEventListener("submit", upscale);
  $("#interrogate-form").addEventListener("submit", interrogate);
  $("#caption-use").addEventListener("click", () => {
    app.views.create.setPrompt($("#caption").value);
    app.go("create");
  });
  loadUpscalers();
  return { show() {} };
}
