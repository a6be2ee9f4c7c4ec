// The inpainting mask, painted with a pointer on a canvas laid over the picture. The canvas has
// the picture's own size (CSS scales it to fit), so the mask that is sent is exactly the size
// of the image: white where the picture is to be regenerated, black where it is kept.

const PAINT = "rgb(255, 64, 160)"; // shown at half opacity over the picture; only alpha counts

export class MaskEditor {
  /**
   * @param canvas     the overlay canvas (positioned over the picture by CSS)
   * @param onChange   called after every change of the mask
   */
  constructor(canvas, onChange = () => {}) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.onChange = onChange;
    this.brushSize = 16;
    this.erasing = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (event) => this.down(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    for (const end of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(end, () => this.up());
    }
  }

  /** Start over for a picture of ``width`` x ``height`` pixels. */
  resize(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  /** The point of ``event`` in picture pixels. */
  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * this.canvas.width) / box.width,
      y: ((event.clientY - box.top) * this.canvas.height) / box.height,
    };
  }

  down(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture?.(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  up() {
    if (!this.last) return;
    this.last = null;
    this.onChange();
  }

  stroke(from, to) {
    const c = this.context;
    c.save();
    c.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    c.strokeStyle = PAINT;
    c.fillStyle = PAINT;
    c.lineWidth = this.brushSize;
    c.lineCap = "round";
    c.lineJoin = "round";
    c.beginPath();
    c.moveTo(from.x, from.y);
    c.lineTo(to.x + 0.01, to.y); // a zero-length line draws no cap in some browsers
    c.stroke();
    c.restore();
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.onChange();
  }

  /** Painted becomes unpainted and the other way round. */
  invert() {
    const { width, height } = this.canvas;
    if (!width || !height) return;
    const pixels = this.context.getImageData(0, 0, width, height);
    const [r, g, b] = PAINT.match(/\d+/g).map(Number);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const painted = d[i + 3] >= 128;
      d[i] = r;
      d[i + 1] = g;
      d[i + 2] = b;
      d[i + 3] = painted ? 0 : 255;
    }
    this.context.putImageData(pixels, 0, 0);
    this.onChange();
  }

  /** How many pixels are painted (a stroke's soft edge counts from half opacity on). */
  paintedPixels() {
    const { width, height } = this.canvas;
    if (!width || !height) return 0;
    const d = this.context.getImageData(0, 0, width, height).data;
    let count = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] >= 128) count++;
    return count;
  }

  /** The mask as a PNG data: URL, the picture's size: white = regenerate, black = keep. */
  toDataUrl() {
    const { width, height } = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const context = out.getContext("2d");
    const painted = this.context.getImageData(0, 0, width, height).data;
    const mask = context.createImageData(width, height);
    for (let i = 0; i < painted.length; i += 4) {
      const value = painted[i + 3] >= 128 ? 255 : 0;
      mask.data[i] = mask.data[i + 1] = mask.data[i + 2] = value;
      mask.data[i + 3] = 255;
    }
    context.putImageData(mask, 0, 0);
    return out.toDataURL("image/png");
  }
}
