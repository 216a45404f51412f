/**
 * Byte-range arithmetic for free-space maps, and the bitmap scanner both filesystems use.
 *
 * Free ranges are built by scanning allocation bitmaps a byte at a time: 0x00 (eight free
 * units) and 0xFF (eight used units) are the common bytes and take one comparison; only
 * mixed bytes are looked at bit by bit. Runs are kept as unit numbers and turned into byte
 * ranges once, at the end. All offsets are plain numbers below 2^53: no bit operators on
 * them, only on bitmap bytes.
 */
import type { ByteRange } from '../types.js';

/** Sorted, non-overlapping, non-adjacent, non-empty copies of `ranges`. */
export function normalizeRanges(ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = ranges.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: ByteRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) {
      const end = Math.max(last.offset + last.length, r.offset + r.length);
      last.length = end - last.offset;
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

/** The parts of normalized `ranges` inside [start, end). */
export function clipRanges(ranges: readonly ByteRange[], start: number, end: number): ByteRange[] {
  const out: ByteRange[] = [];
  for (const r of ranges) {
    const lo = Math.max(r.offset, start);
    const hi = Math.min(r.offset + r.length, end);
    if (hi > lo) out.push({ offset: lo, length: hi - lo });
  }
  return out;
}

/** Normalized `ranges` minus every byte of `holes` (any order). */
export function subtractRanges(ranges: readonly ByteRange[], holes: readonly ByteRange[]): ByteRange[] {
  const hs = normalizeRanges(holes);
  const out: ByteRange[] = [];
  let h = 0;
  for (const r of ranges) {
    let start = r.offset;
    const end = r.offset + r.length;
    while (h < hs.length && hs[h].offset + hs[h].length <= start) h++;
    let k = h;
    while (k < hs.length && hs[k].offset < end) {
      if (hs[k].offset > start) out.push({ offset: start, length: hs[k].offset - start });
      start = Math.max(start, hs[k].offset + hs[k].length);
      k++;
    }
    if (end > start) out.push({ offset: start, length: end - start });
  }
  return out;
}

export function totalLength(ranges: readonly ByteRange[]): number {
  let n = 0;
  for (const r of ranges) n += r.length;
  return n;
}

/**
 * Collects runs of free allocation units (ext blocks, NTFS clusters) from bitmap pieces
 * fed in ascending unit order, where a set bit means "in use" and bit k of byte j is unit
 * 8j + k (least significant bit first, as both ext and NTFS store them). Runs that touch
 * across pieces are joined. Runs shorter than `minUnits` are dropped once complete: a
 * badly fragmented 2 TiB volume could otherwise hold 2^28 runs.
 */
export class FreeRunCollector {
  /** Closed runs as [startUnit, endUnit) pairs, flat. */
  private readonly runs: number[] = [];
  private openStart = -1;
  private openEnd = -1;
  private lastUnit = 0;
  /** Units in the runs kept (dropped short runs do not count). */
  freeUnits = 0;

  /** Unit u lives at byte `baseOffset + u * unitSize` of the device. */
  constructor(readonly baseOffset: number, readonly unitSize: number, readonly minUnits = 1) {}

  /** Bits 0..count-1 of `bitmap` describe units firstUnit..firstUnit+count-1. */
  addBitmap(bitmap: Uint8Array, firstUnit: number, count: number): void {
    if (count > bitmap.length * 8) {
      throw new RangeError(`bitmap of ${bitmap.length} bytes cannot describe ${count} units`);
    }
    if (firstUnit < this.lastUnit) {
      throw new RangeError(`bitmap pieces must come in order: unit ${firstUnit} after unit ${this.lastUnit}`);
    }
    this.lastUnit = firstUnit + count;
    const fullBytes = Math.floor(count / 8);
    let runStart = -1; // relative to firstUnit
    for (let i = 0; i < fullBytes; i++) {
      const b = bitmap[i];
      if (b === 0x00) {
        if (runStart < 0) runStart = i * 8;
      } else if (b === 0xff) {
        if (runStart >= 0) {
          this.free(firstUnit + runStart, firstUnit + i * 8);
          runStart = -1;
        }
      } else {
        for (let bit = 0; bit < 8; bit++) {
          if ((b >> bit) & 1) {
            if (runStart >= 0) {
              this.free(firstUnit + runStart, firstUnit + i * 8 + bit);
              runStart = -1;
            }
          } else if (runStart < 0) {
            runStart = i * 8 + bit;
          }
        }
      }
    }
    for (let u = fullBytes * 8; u < count; u++) {
      if ((bitmap[Math.floor(u / 8)] >> (u % 8)) & 1) {
        if (runStart >= 0) {
          this.free(firstUnit + runStart, firstUnit + u);
          runStart = -1;
        }
      } else if (runStart < 0) {
        runStart = u;
      }
    }
    if (runStart >= 0) this.free(firstUnit + runStart, firstUnit + count);
  }

  private free(start: number, end: number): void {
    if (start === this.openEnd) {
      this.openEnd = end;
      return;
    }
    this.close();
    this.openStart = start;
    this.openEnd = end;
  }

  private close(): void {
    if (this.openStart >= 0 && this.openEnd - this.openStart >= this.minUnits) {
      this.runs.push(this.openStart, this.openEnd);
      this.freeUnits += this.openEnd - this.openStart;
    }
    this.openStart = -1;
    this.openEnd = -1;
  }

  /** The free runs as device byte ranges, sorted and merged. Ends the collection. */
  ranges(): ByteRange[] {
    this.close();
    const out: ByteRange[] = [];
    for (let i = 0; i < this.runs.length; i += 2) {
      out.push({ offset: this.baseOffset + this.runs[i] * this.unitSize, length: (this.runs[i + 1] - this.runs[i]) * this.unitSize });
    }
    return out;
  }
}
