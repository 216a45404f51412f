/**
 * Byte-range copies between the disk image and a partition held in its own file, and
 * whole-file hashing. ntfs-3g cannot mount at an offset, so an NTFS partition is copied out
 * to a "sidecar" file, mounted, and copied back. Both directions keep the disk sparse:
 * copying out skips all-zero chunks (they stay holes in the sidecar), and copying back
 * writes only the chunks that differ from what the disk already holds — so a mutate round
 * writes the few MiB ntfs-3g changed, not the whole partition, and a zero chunk of the disk
 * is never turned into allocated zeros unless the filesystem really wrote there.
 */
import { createHash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { run } from './exec.js';

const CHUNK = 1024 * 1024;
const ZERO_CHUNK = Buffer.alloc(CHUNK);

/** Reads exactly `length` bytes at `at` into `buf` (a short read past the end is an error). */
async function readFully(fh: FileHandle, buf: Buffer, length: number, at: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const { bytesRead } = await fh.read(buf, done, length - done, at + done);
    if (bytesRead === 0) throw new RangeError(`short read: ${length - done} bytes missing at offset ${at + done}`);
    done += bytesRead;
  }
}

async function writeFully(fh: FileHandle, buf: Buffer, length: number, at: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const { bytesWritten } = await fh.write(buf, done, length - done, at + done);
    done += bytesWritten;
  }
}

function isZero(buf: Buffer, length: number): boolean {
  return buf.subarray(0, length).equals(ZERO_CHUNK.subarray(0, length));
}

/** A byte range [offset, offset + length). */
export interface Range {
  offset: number;
  length: number;
}

/**
 * The ranges of [offset, offset + length) of `path` that hold data (not holes), rounded out
 * to whole chunks, from FIEMAP through `filefrag` (which reports delayed-allocation extents
 * too, so no sync is needed). Where FIEMAP is unsupported (tmpfs), the whole range.
 */
export async function dataRanges(path: string, offset: number, length: number): Promise<Range[]> {
  let out: string;
  try {
    out = (await run('filefrag', ['-v', '-b4096', path])).stdout;
  } catch {
    return [{ offset, length }];
  }
  const unit = Number(/blocks of (\d+) bytes/.exec(out)?.[1]);
  if (!(unit > 0)) return [{ offset, length }];
  const ranges: Range[] = [];
  const end = offset + length;
  for (const m of out.matchAll(/^\s*\d+:\s*(\d+)\.\.\s*(\d+):/gm)) {
    // Round out to chunk boundaries relative to `offset`, and clip to the range asked for.
    const first = Math.max(offset, offset + Math.floor((Number(m[1]) * unit - offset) / CHUNK) * CHUNK);
    const last = Math.min(end, offset + Math.ceil(((Number(m[2]) + 1) * unit - offset) / CHUNK) * CHUNK);
    if (last <= first) continue;
    const prev = ranges[ranges.length - 1];
    if (prev && first <= prev.offset + prev.length) prev.length = Math.max(prev.length, last - prev.offset);
    else ranges.push({ offset: first, length: last - first });
  }
  return ranges;
}

/** The union of two sorted, non-overlapping range lists (each already merged). */
function union(a: Range[], b: Range[]): Range[] {
  const all = [...a, ...b].sort((x, y) => x.offset - y.offset);
  const out: Range[] = [];
  for (const r of all) {
    const prev = out[out.length - 1];
    if (prev && r.offset <= prev.offset + prev.length) prev.length = Math.max(prev.length, r.offset + r.length - prev.offset);
    else out.push({ ...r });
  }
  return out;
}

/**
 * Copies `length` bytes from `src` at `srcAt` to `dst` at `dstAt`. With `onlyChanged`, a
 * chunk is written only where it differs from what `dst` holds; with `skipZeros`, only
 * where it is not all zeros (for a `dst` known to be zero there, such as a fresh sparse
 * file). Chunks that are holes in both files are not read at all. Returns bytes written.
 */
export async function copyRegion(
  srcPath: string,
  srcAt: number,
  dstPath: string,
  dstAt: number,
  length: number,
  mode: 'skipZeros' | 'onlyChanged',
): Promise<number> {
  // Ranges relative to the start of the region.
  const rel = (rs: Range[], base: number): Range[] => rs.map((r) => ({ offset: r.offset - base, length: r.length }));
  let ranges = rel(await dataRanges(srcPath, srcAt, length), srcAt);
  if (mode === 'onlyChanged') ranges = union(ranges, rel(await dataRanges(dstPath, dstAt, length), dstAt));
  const chunks: Range[] = [];
  for (const r of ranges) {
    for (let pos = r.offset; pos < r.offset + r.length; pos += CHUNK) chunks.push({ offset: pos, length: Math.min(CHUNK, r.offset + r.length - pos) });
  }
  const src = await open(srcPath, 'r');
  try {
    const dst = await open(dstPath, 'r+');
    try {
      let written = 0;
      let next = 0;
      // A few chunks in flight: the reads are thread-pool round trips, not memory bandwidth.
      const worker = async (): Promise<void> => {
        const a = Buffer.alloc(CHUNK);
        const b = Buffer.alloc(CHUNK);
        while (next < chunks.length) {
          const { offset: pos, length: n } = chunks[next++] as Range;
          if (mode === 'onlyChanged') {
            await Promise.all([readFully(src, a, n, srcAt + pos), readFully(dst, b, n, dstAt + pos)]);
            if (a.subarray(0, n).equals(b.subarray(0, n))) continue;
          } else {
            await readFully(src, a, n, srcAt + pos);
            if (isZero(a, n)) continue;
          }
          await writeFully(dst, a, n, dstAt + pos);
          written += n;
        }
      };
      await Promise.all([worker(), worker(), worker(), worker()]);
      return written;
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
  }
}

/** sha256 (hex) of a whole file, reading 4 MiB at a time with the next read in flight. */
export async function sha256File(path: string): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const hash = createHash('sha256');
    const size = (await fh.stat()).size;
    const block = 4 * 1024 * 1024;
    let bufs = [Buffer.alloc(block), Buffer.alloc(block)] as const;
    let pending = size > 0 ? fh.read(bufs[0], 0, Math.min(block, size), 0) : undefined;
    for (let pos = 0; pending; ) {
      const { bytesRead } = await pending;
      if (bytesRead === 0) throw new RangeError(`short read at offset ${pos} of ${path} (size ${size})`);
      const current = bufs[0];
      pos += bytesRead;
      pending = pos < size ? fh.read(bufs[1], 0, Math.min(block, size - pos), pos) : undefined;
      hash.update(current.subarray(0, bytesRead));
      bufs = [bufs[1], bufs[0]];
    }
    return hash.digest('hex');
  } finally {
    await fh.close();
  }
}
