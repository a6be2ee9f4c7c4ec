// Image sizes that follow the checkpoint's family, as the API's defaults do.

/** Each model family's native side in pixels (what the API uses when no size is sent). */
export const NATIVE_SIDE = { sd15: 512, sdxl: 1024 };

/**
 * The side to show once a checkpoint of `family` is chosen: its native side while `side` is
 * still some family's native side (nobody picked another), else `side` as the person set it.
 */
export function sideFor(side, family) {
  const native = NATIVE_SIDE[family];
  if (native === undefined) return side;
  return Object.values(NATIVE_SIDE).includes(side) ? native : side;
}
