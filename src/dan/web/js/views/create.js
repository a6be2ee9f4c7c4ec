// Create: txt2img, img2img and inpaint in one form, with LoRAs, hires fix and one ControlNet
// unit; the task panel beside it shows progress and the results.

import {
  $,
  $$,
  acceptImages,
  el,
  fillSelect,
  loadImage,
  numberOf,
  readDataUrl,
  say,
} from "../dom.js";
import { samplerOf, settingsOfPng } from "../png.js";
import { sideFor } from "../sizes.js";
import { MaskEditor } from "../mask.js";
import { TaskPanel } from "../task-panel.js";
import { Status, watchTask } from "../watch.js";

const SHORT_HASH = 10; // AUTOMATIC1111's short hash: the first 10 hex digits of the sha256

/** A multiple of 8 in the API's range, for an input image's side. */
const side = (pixels) => Math.min(2048, Math.max(64, Math.floor(pixels / 8) * 8));

export function setupCreate(app) {
  const form = $("#create-form");
  const error = $("#create-error");
  const state = {
    mode: "txt2img",
    image: null,
    control: null,
    lastSeed: null,
    loras: [],
    schedules: {}, // sampler -> the schedule types it runs with
  };
  const editor = new MaskEditor($("#mask-canvas"));
  const panel = new TaskPanel(
    $("#create-task"),
    app.api,
    {
      onSettings: (bytes) => reuse(bytes),
      onUseImage: (dataUrl) => useImage(dataUrl),
    },
    "Generation",
  );

  // --- the form's parts --------------------------------------------------------------------

  function setMode(mode) {
    state.mode = mode;
    const image = mode !== "txt2img";
    $("#image-fields").hidden = !image;
    $("#hires-fields").hidden = mode !== "txt2img";
    $("#mask-tools").hidden = mode !== "inpaint";
    $("#mask-canvas").hidden = mode !== "inpaint";
    for (const radio of $$('input[name="mode"]')) radio.checked = radio.value === mode;
  }

  async function useImage(dataUrl) {
    try {
      const image = await loadImage(dataUrl);
      state.image = { dataUrl, width: image.naturalWidth, height: image.naturalHeight };
    } catch (err) {
      say(error, `That image cannot be used: ${err.message}`);
      return;
    }
    const { width, height } = state.image;
    $("#init-preview").src = dataUrl;
    $("#editor").hidden = false;
    editor.resize(width, height);
    setBrush(Math.max(2, Math.round(Math.max(width, height) / 16)));
    $("#width").value = side(width);
    $("#height").value = side(height);
    if (state.mode === "txt2img") setMode("img2img");
    app.go("create");
  }

  function setBrush(size) {
    const clamped = Math.min(256, Math.max(1, size));
    editor.brushSize = clamped;
    $("#brush-size").value = clamped;
    $("#brush-size-value").textContent = clamped;
  }

  function addLora(ref = null, weight = 1) {
    const index = $("#loras").children.length + 1;
    const select = el("select", { id: `lora-${index}`, class: "lora-model" });
    fillSelect(
      select,
      state.loras.map((l) => [l.hash, `${l.name} [${l.hash.slice(0, SHORT_HASH)}]`]),
    );
    if (ref) select.value = ref;
    const weightInput = el("input", {
      id: `lora-${index}-weight`,
      class: "lora-weight",
      type: "number",
      min: -4,
      max: 4,
      step: 0.05,
      value: weight,
    });
    const row = el(
      "li",
      { class: "lora" },
      el("label", { for: select.id }, `LoRA ${index}`),
      select,
      el("label", { for: weightInput.id }, "Weight"),
      weightInput,
      el(
        "button",
        {
          type: "button",
          class: "secondary",
          "aria-label": `Remove LoRA ${index}`,
          onclick: () => {
            row.remove();
            $("#lora-add").focus();
          },
        },
        "Remove",
      ),
    );
    $("#loras").append(row);
    return select;
  }

  async function loadModels() {
    try {
      const info = await app.models();
      const models = info.Models || [];
      fillSelect(
        $("#model"),
        models.map((m) => [
          m.hash,
          `${m.name} [${m.hash.slice(0, SHORT_HASH)}]${m.family ? ` · ${m.family}` : ""}`,
        ]),
      );
      if (!models.length) fillSelect($("#model"), [["", "No checkpoint installed"]]);
      state.families = Object.fromEntries(models.map((m) => [m.hash, m.family]));
      followFamily();
      // Each sampler once, with a schedule type beside it (servers that list none: the names).
      state.schedules = info.SamplerSchedulers || {};
      const samplers = Object.keys(state.schedules);
      fillSelect(
        $("#sampler"),
        (samplers.length ? samplers : info.Samplers || []).map((s) => [s, s]),
      );
      fillSchedules();
      fillSelect(
        $("#hires-upscaler"),
        (info.HiresUpscalers || []).map((u) => [u, u]),
      );
      state.loras = info.LoRAs || [];
      $("#lora-add").hidden = !state.loras.length;
      $("#lora-none").hidden = Boolean(state.loras.length);
    } catch (err) {
      app.notice(`Could not list the models: ${err.message}`);
    }
  }

  /** The schedule types of the chosen sampler (the one chosen before, where it has it). */
  function fillSchedules() {
    const types = state.schedules[$("#sampler").value] || ["Automatic"];
    fillSelect(
      $("#scheduler"),
      types.map((t) => [t, t]),
    );
  }

  // --- what is sent ------------------------------------------------------------------------

  function controlUnit() {
    const canny = $("#cn-preprocess").value === "canny";
    return {
      image: state.control,
      preprocess: $("#cn-preprocess").value,
      model: $("#cn-model").value,
      preprocess_param1: canny ? numberOf($("#cn-low")) : undefined,
      preprocess_param2: canny ? numberOf($("#cn-high")) : undefined,
      weight: numberOf($("#cn-weight")),
      resize_mode: Number($("#cn-resize").value),
      guidance_start: numberOf($("#cn-start")),
      guidance_end: numberOf($("#cn-end")),
      guessmode: $("#cn-guess").checked,
    };
  }

  function generationBody() {
    const body = {
      prompt: $("#prompt").value,
      negative_prompt: $("#negative-prompt").value,
      model: $("#model").value || undefined,
      sampler_name: $("#sampler").value,
      scheduler: $("#scheduler").value,
      steps: numberOf($("#steps")),
      cfg_scale: numberOf($("#cfg")),
      width: numberOf($("#width")),
      height: numberOf($("#height")),
      seed: numberOf($("#seed"), -1),
    };
    const loras = $$("#loras li").map((row) => [
      $(".lora-model", row).value,
      numberOf($(".lora-weight", row), 1),
    ]);
    if (loras.length) body.loras = loras;
    if ($("#cn-on").checked) body.control_net = [controlUnit()];
    return body;
  }

  function txt2imgBody() {
    const body = generationBody();
    if ($("#hires-on").checked) {
      body.upscale = {
        scale: numberOf($("#hires-scale")),
        denoising_strength: numberOf($("#hires-denoise")),
        upscaler: $("#hires-upscaler").value,
      };
    }
    return body;
  }

  function img2imgBody() {
    const body = {
      ...generationBody(),
      init_image: state.image?.dataUrl,
      resize_mode: Number($("#resize-mode").value),
      denoising_strength: numberOf($("#denoise")),
    };
    if (state.mode === "inpaint") {
      body.inpaint = {
        mask: editor.toDataUrl(),
        mask_blur: numberOf($("#mask-blur"), 0),
        mask_mode: Number($("#mask-mode").value),
        inpaint_area: Number($("#inpaint-area").value),
      };
    }
    return body;
  }

  /** What the page checks itself: the API cannot know what the user meant to paint. */
  function problem() {
    if (state.mode !== "txt2img" && !state.image) return "Choose an input image first.";
    if (state.mode === "inpaint" && editor.paintedPixels() === 0) {
      return "Paint the part of the picture to regenerate first (or invert the mask).";
    }
    if ($("#cn-on").checked && !state.control) return "Choose a ControlNet control image first.";
    return "";
  }

  async function generate(event) {
    event.preventDefault();
    say(error, problem());
    if (!error.hidden) return;
    const image = state.mode !== "txt2img";
    const body = image ? img2imgBody() : txt2imgBody();
    const path = image ? "/api/sd/img2img/async" : "/api/sd/txt2img/async";
    const button = $("#generate");
    button.disabled = true;
    try {
      await panel.run(() => app.api.post(path, body));
    } finally {
      button.disabled = false;
    }
  }

  panel.actions.onFinished = (taskId, data) => {
    const seed = data.seeds?.[0];
    if (seed !== undefined) {
      state.lastSeed = seed;
      $("#seed-reuse").disabled = false;
    }
  };

  /** Width and height follow the chosen checkpoint's family until someone sets a size. */
  function followFamily() {
    const family = state.families?.[$("#model").value];
    for (const id of ["#width", "#height"]) {
      const value = numberOf($(id));
      const next = sideFor(value, family);
      if (next !== value) $(id).value = next;
    }
  }

  // --- settings read back ------------------------------------------------------------------

  function selectModel(hash, name) {
    const select = $("#model");
    const option =
      [...select.options].find((o) => hash && o.value.startsWith(String(hash).toLowerCase())) ||
      [...select.options].find((o) => name && o.textContent.startsWith(`${name} [`));
    if (option) select.value = option.value;
  }

  function setValue(selector, value) {
    if (value !== undefined && value !== null && !Number.isNaN(value)) $(selector).value = value;
  }

  /** Fill the form with ``settings`` (from a PNG's parameters or a history entry). */
  function apply(settings) {
    setValue("#prompt", settings.prompt);
    setValue("#negative-prompt", settings.negativePrompt);
    setValue("#steps", settings.steps);
    setValue("#cfg", settings.cfgScale);
    setValue("#seed", settings.seed);
    setValue("#width", settings.width);
    setValue("#height", settings.height);
    const [sampler, scheduler] = samplerOf(settings.sampler, settings.scheduler);
    if ([...$("#sampler").options].some((o) => o.value === sampler)) {
      $("#sampler").value = sampler;
      fillSchedules();
    }
    if ([...$("#scheduler").options].some((o) => o.value === scheduler)) {
      $("#scheduler").value = scheduler;
    }
    selectModel(settings.modelHash, settings.modelName);
    const hires = settings.hiresScale !== undefined && !Number.isNaN(settings.hiresScale);
    $("#hires-on").checked = hires;
    $("#hires-options").hidden = !hires;
    if (hires) {
      setMode("txt2img");
      setValue("#hires-scale", settings.hiresScale);
      setValue("#hires-denoise", settings.denoisingStrength);
      setValue("#hires-upscaler", settings.hiresUpscaler);
    } else if (settings.denoisingStrength !== undefined) {
      setValue("#denoise", settings.denoisingStrength);
    }
    if (settings.loras) {
      $("#loras").replaceChildren();
      for (const [name, hash, weight] of settings.loras) {
        const known = state.loras.find((l) => l.hash.startsWith(hash) || l.name === name);
        if (known) addLora(known.hash, weight);
      }
    }
  }

  async function reuse(bytes) {
    try {
      const settings = await settingsOfPng(bytes);
      if (!settings) throw new Error("this PNG carries no generation parameters");
      apply(settings);
      app.go("create");
      $("#prompt").focus();
    } catch (err) {
      say(error, `Could not read the settings: ${err.message}`);
    }
  }

  // --- ControlNet preview ------------------------------------------------------------------

  async function detect() {
    const status = $("#cn-detect-status");
    const cnError = $("#cn-error");
    say(cnError, "");
    if (!state.control) return say(cnError, "Choose a control image first.");
    const unit = controlUnit();
    status.textContent = "Preprocessing…";
    try {
      const accepted = await app.api.post("/api/sd/controlnet/detect/async", {
        image: unit.image,
        preprocess: unit.preprocess,
        preprocess_param1: unit.preprocess_param1,
        preprocess_param2: unit.preprocess_param2,
      });
      const data = await watchTask(app.api, accepted.taskId, () => {});
      if (data.status !== Status.SUCCESS)
        throw new Error(data.message || "the preprocessor failed");
      $("#cn-preview").src = `data:image/png;base64,${data.images[0]}`;
      $("#cn-preview").hidden = false;
      status.textContent = "";
    } catch (err) {
      status.textContent = "";
      say(cnError, err.message);
    }
  }

  // --- wiring ------------------------------------------------------------------------------

  for (const radio of $$('input[name="mode"]')) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  acceptImages($("#init-drop"), $("#init-image"), async (file) => {
    try {
      await useImage(await readDataUrl(file));
    } catch (err) {
      say(error, err.message);
    }
  });
  acceptImages($("#cn-drop"), $("#cn-image"), async (file) => {
    state.control = await readDataUrl(file);
    $("#cn-source").src = state.control;
    $("#cn-source").hidden = false;
    $("#cn-preview").hidden = true;
  });
  $("#brush-size").addEventListener("input", () => setBrush(Number($("#brush-size").value)));
  for (const radio of $$('input[name="brush"]')) {
    radio.addEventListener(
      "change",
      () => (editor.erasing = radio.value === "erase" && radio.checked),
    );
  }
  $("#mask-clear").addEventListener("click", () => editor.clear());
  $("#mask-invert").addEventListener("click", () => editor.invert());
  $("#sampler").addEventListener("change", fillSchedules);
  $("#model").addEventListener("change", followFamily);
  $("#seed-random").addEventListener("click", () => ($("#seed").value = -1));
  $("#seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) $("#seed").value = state.lastSeed;
  });
  $("#lora-add").addEventListener("click", () => addLora(state.loras[0]?.hash).focus());
  $("#hires-on").addEventListener(
    "change",
    () => ($("#hires-options").hidden = !$("#hires-on").checked),
  );
  $("#cn-on").addEventListener("change", () => ($("#cn-options").hidden = !$("#cn-on").checked));
  $("#cn-preprocess").addEventListener("change", () => {
    const canny = $("#cn-preprocess").value === "canny";
    for (const field of $$(".only-canny")) field.hidden = !canny;
    $("#cn-model").value = canny ? "sd15_canny" : "sd15_openpose";
  });
  $("#cn-detect").addEventListener("click", detect);
  form.addEventListener("submit", generate);
  setMode("txt2img");
  loadModels();

  return {
    show() {},
    apply,
    reuseBytes: reuse,
    setPrompt(text) {
      $("#prompt").value = text;
    },
    useImage,
  };
}
