// Proves the qcow2 codec against qemu-img, qemu-io and libqcow: our images (1 GiB, odd sizes, 2 TiB) compare identical, check clean with no leaks and read back; qemu's images (v2, v3, compressed zlib/zstd, 4 KiB and 2 MiB clusters, backing chains with zero clusters) read byte-identically; grown-in-place images stay identical and clean over sessions; a crash at any step of a write session leaves at most leaks and old-or-new content; bad input gives typed errors.
import t, { type Test } from 'tap';
import { copyFile, open, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { LocalFile } from '../src/formats/local-file.js';
import { MemoryFile } from '../src/formats/memory-file.js';
import { isAllZero } from '../src/formats/bytes.js';
import type { DiskImage, DiskWriter, FileOpener } from '../src/formats/disk-image.js';
import type { ByteRange, RandomAccessFile } from '../src/formats/types.js';
import { ChainBrokenError, CorruptImageError, ForeignFormatError, ImagekeepError, InjectedCrash, UnsupportedVersionError, UsageError } from '../src/formats/errors.js';
import { qcow2Driver, checkQcow2 } from '../src/formats/qcow2/index.js';
import { decodeCompressed, entryOffset, getRefcount, setRefcount, writeEntry } from '../src/formats/qcow2/codec.js';
import { libyalCompare, libyalInfo, makeScatteredRaw, qemuCheck, qemuCompare, qemuConvert, qemuInfo, qemuToRaw, runTool } from './helpers/disk-tools.js';
import { prng, tempDir } from './helpers/cli.js';

const { dir: work, cleanup } = await tempDir('qcow2');
t.teardown(cleanup);

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

/** Opens files named relative to the directory of `image` (as a backing file name is). */
function openerFor(image: string): FileOpener {
  return (name, mode) => LocalFile.open(resolve(dirname(image), name), mode);
}

async function must(cmd: string, args: string[]): Promise<string> {
  const r = await runTool(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: rc ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** Opens through the driver; the file is ours to close if opening fails. */
async function openImage(path: string): Promise<DiskImage> {
  const f = await LocalFile.open(path, 'r');
  try {
    return await qcow2Driver.open(f, openerFor(path));
  } catch (e) {
    await f.close();
    throw e;
  }
}

async function create(path: string, size: number, blockSize?: number): Promise<DiskWriter> {
  const create = qcow2Driver.create;
  if (!create) throw new Error('qcow2 driver cannot create');
  const f = await LocalFile.open(path, 'w');
  try {
    return await create(f, openerFor(path), { size, finalName: path, blockSize });
  } catch (e) {
    await f.close();
    throw e;
  }
}

async function openWritable(path: string, wrap?: (f: RandomAccessFile) => RandomAccessFile): Promise<DiskWriter> {
  const ow = qcow2Driver.openWritable;
  if (!ow) throw new Error('qcow2 driver cannot grow in place');
  const f = await LocalFile.open(path, 'r+');
  try {
    return await ow(wrap ? wrap(f) : f, openerFor(path));
  } catch (e) {
    await f.close();
    throw e;
  }
}

async function ourCheck(path: string) {
  const f = await LocalFile.open(path, 'r');
  try {
    return await checkQcow2(f, openerFor(path));
  } finally {
    await f.close();
  }
}

/**
 * Copies a raw file into a writer as an export does: ascending requests of `chunk` bytes,
 * all-zero ones skipped. With `extents` (where the raw has data), chunks that miss every
 * extent are known to be zero and not even read.
 */
async function exportRaw(raw: string, w: DiskWriter, extents?: ByteRange[], chunk = 2 * MiB): Promise<void> {
  const fh = await open(raw, 'r');
  try {
    const size = (await fh.stat()).size;
    const buf = Buffer.alloc(chunk);
    let e = 0;
    for (let at = 0; at < size; at += chunk) {
      const n = Math.min(chunk, size - at);
      if (extents) {
        while (e < extents.length && extents[e].offset + extents[e].length <= at) e++;
        if (e >= extents.length || extents[e].offset >= at + n) continue;
      }
      const part = buf.subarray(0, n);
      await fh.read(part, 0, n, at);
      if (!isAllZero(part)) await w.write(part, at);
    }
  } finally {
    await fh.close();
  }
}

/**
 * Reads the whole image in `chunk` pieces and compares with the raw file; returns the first
 * differing offset or -1. With `extents` (where the raw has data), chunks that miss every
 * extent are only checked to read as zeros.
 */
async function firstDifference(img: DiskImage, raw: string, chunk = 4 * MiB, extents?: ByteRange[]): Promise<number> {
  const fh = await open(raw, 'r');
  try {
    const size = (await fh.stat()).size;
    if (size !== img.size) return Math.min(size, img.size);
    const a = Buffer.alloc(chunk);
    const b = Buffer.alloc(chunk);
    const zero = Buffer.alloc(extents ? chunk : 0);
    let e = 0;
    for (let at = 0; at < size; at += chunk) {
      const n = Math.min(chunk, size - at);
      await img.read(a.subarray(0, n), at);
      if (extents) {
        while (e < extents.length && extents[e].offset + extents[e].length <= at) e++;
        if (e >= extents.length || extents[e].offset >= at + n) {
          if (!a.subarray(0, n).equals(zero.subarray(0, n))) for (let i = 0; i < n; i++) if (a[i] !== 0) return at + i;
          continue;
        }
      }
      await fh.read(b, 0, n, at);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) {
        for (let i = 0; i < n; i++) if (a[i] !== b[i]) return at + i;
      }
    }
    return -1;
  } finally {
    await fh.close();
  }
}

/** Random byte ranges (any offset, any length) read through the image equal the raw file's. */
async function randomReadsMatch(img: DiskImage, raw: string, seed: number, count = 60): Promise<boolean> {
  const rand = prng(seed);
  const fh = await open(raw, 'r');
  try {
    for (let i = 0; i < count; i++) {
      const r = rand(8);
      const len = 1 + (r.readUInt32LE(0) % (300 * KiB));
      const at = r.readUInt32LE(4) % Math.max(1, img.size - len);
      const a = Buffer.alloc(len);
      const b = Buffer.alloc(len);
      await img.read(a, at);
      await fh.read(b, 0, len, at);
      if (!a.equals(b)) return false;
    }
    return true;
  } finally {
    await fh.close();
  }
}

/** Every byte outside the image's allocated() ranges is zero in the raw reference. */
async function holesAreZero(ranges: ByteRange[], raw: string): Promise<boolean> {
  const data = await readFile(raw);
  let at = 0;
  for (const r of [...ranges, { offset: data.length, length: 0 }]) {
    if (!isAllZero(data.subarray(at, r.offset))) return false;
    at = r.offset + r.length;
  }
  return true;
}

/** qemu-img map's ranges with data, merged. */
async function qemuDataRanges(path: string): Promise<ByteRange[]> {
  const map = JSON.parse(await must('qemu-img', ['map', '--output=json', '-f', 'qcow2', path])) as { start: number; length: number; data: boolean }[];
  const out: ByteRange[] = [];
  for (const m of map) {
    if (!m.data) continue;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === m.start) last.length += m.length;
    else out.push({ offset: m.start, length: m.length });
  }
  return out;
}

function qemuCheckJson(stdout: string): Record<string, number | string> {
  return JSON.parse(stdout) as Record<string, number | string>;
}

t.test('codec: 64-bit entries above 2^31 and refcounts of every width round-trip', async (t) => {
  const buf = Buffer.alloc(64);
  for (const off of [0, 512 * KiB, 2 ** 31, 2 ** 32 + 65536, 2 ** 41 - 65536, 2 ** 52]) {
    writeEntry(buf, 1, off, true);
    t.equal(entryOffset(buf.readUInt32BE(8), buf.readUInt32BE(12)), off, `offset ${off}`);
    t.equal(buf.readUInt32BE(8) >>> 31, 1, 'COPIED bit set');
  }
  // Compressed descriptor, 64 KiB clusters: 54 offset bits, then additional sectors.
  const desc = (2n << 54n) | BigInt(3 * GiB + 700);
  const c = decodeCompressed(Number((desc >> 32n) & 0x3fffffffn) | 0x40000000, Number(desc & 0xffffffffn), 16);
  t.same(c, { offset: 3 * GiB + 700, length: 3 * 512 - 700 % 512 }, 'compressed descriptor');
  for (let order = 0; order <= 6; order++) {
    const block = Buffer.alloc(512);
    const entries = (512 * 8) / 2 ** order;
    const max = order === 6 ? 2 ** 40 : 2 ** 2 ** order - 1;
    for (let i = 0; i < entries; i++) setRefcount(block, i, order, (i * 7) % (max + 1));
    let ok = true;
    for (let i = 0; i < entries; i++) if (getRefcount(block, i, order) !== (i * 7) % (max + 1)) ok = false;
    t.ok(ok, `refcount_order ${order}`);
  }
  t.equal(qcow2Driver.probe(Buffer.from('QFI\xfb\0\0\0\x03', 'latin1'), Buffer.alloc(0)), 100, 'probe: qcow2 v3');
  t.equal(qcow2Driver.probe(Buffer.from('conectix'), Buffer.alloc(0)), 0, 'probe: VHD');
  t.equal(qcow2Driver.probe(Buffer.alloc(0), Buffer.alloc(0)), 0, 'probe: empty');
});

for (const [label, size] of [
  ['1 GiB', GiB],
  ['1 GiB + 7 sectors (not a whole number of clusters)', GiB + 7 * 512],
] as const) {
  t.test(`writer: ${label} of scattered data is what qemu-img, libqcow and our reader see`, async (t) => {
    const raw = join(work, `scatter-${size}.raw`);
    const img = join(work, `scatter-${size}.qcow2`);
    const { extents } = await makeScatteredRaw(raw, size, { seed: size % 1000, count: 80 });
    const w = await create(img, size);
    t.equal(w.size, size);
    await exportRaw(raw, w, extents);
    // The writer's own view before closing (pending metadata included).
    const probe = Buffer.alloc(512);
    await w.read(probe, size - 512);
    t.same(probe, (await readFile(raw)).subarray(size - 512), 'writer reads back its last sector');
    await w.close();

    t.equal((await qemuCompare(raw, img, 'qcow2')).code, 0, 'qemu-img compare: identical');
    const check = await qemuCheck(img, 'qcow2');
    t.equal(check.code, 0, `qemu-img check rc 0 (${check.stdout.trim()})`);
    t.notOk('leaks' in qemuCheckJson(check.stdout), 'no leaks');
    const info = await qemuInfo(img, 'qcow2');
    t.equal(info['virtual-size'], size, 'virtual size exact');
    t.equal(info.format, 'qcow2');
    t.equal(info['cluster-size'], 65536);
    t.equal(info['format-specific']?.data.compat, '1.1');
    t.equal(info['format-specific']?.data['refcount-bits'], 16);
    t.equal(info['format-specific']?.data.corrupt, false);
    const qi = await libyalInfo(img, 'qcow2');
    t.equal(qi.code, 0, 'qcowinfo parses it');
    t.match(qi.stdout, new RegExp(`Media size\\s*:.*${size} bytes`), 'qcowinfo media size');
    t.equal((await libyalCompare(img, raw)).code, 0, 'libqcow reads it identically');

    const ours = await ourCheck(img);
    t.same(ours.problems, [], 'our check: no problems');
    t.equal(ours.layout.virtualSize, size);
    t.equal(ours.layout.allocatedClusters, qemuCheckJson(check.stdout)['allocated-clusters'], 'our check counts what qemu-img check counts');
    const d = await openImage(img);
    try {
      t.equal(d.size, size);
      t.equal(d.subformat, 'v3');
      t.equal(await firstDifference(d, raw, 4 * MiB, extents), -1, 'our reader = raw');
      t.ok(await randomReadsMatch(d, raw, 7), 'random unaligned reads = raw');
      t.same(await d.allocated(), await qemuDataRanges(img), 'allocated() = qemu-img map data ranges');
    } finally {
      await d.close();
    }
  });
}

t.test('writer: a 2 TiB disk holding a few clusters', async (t) => {
  const img = join(work, 'big.qcow2');
  const size = 2 * TiB;
  const cs = 65536;
  // Clusters filled with one byte each, around the 2^31, 2^32 and 2^40 boundaries and at the end.
  const spots = [0, 2 ** 31 - cs, 2 ** 31, 2 ** 32 + 3 * cs, 2 ** 40 + 5 * cs, 1.5 * TiB, size - 2 * cs, size - cs];
  const w = await create(img, size);
  for (let i = 0; i < spots.length; i++) await w.write(Buffer.alloc(cs, 0x11 * (i + 1)), spots[i]);
  // A write that is sector- but not cluster-aligned, into an unallocated cluster.
  const oddAt = 2 ** 35 + 3 * 512;
  await w.write(Buffer.alloc(2048, 0xee), oddAt);
  await w.close();

  const info = await qemuInfo(img, 'qcow2');
  const check = await qemuCheck(img, 'qcow2');
  t.equal(check.code, 0, 'qemu-img check rc 0');
  const q = qemuCheckJson(check.stdout);
  const d = await openImage(img);
  const ours = await ourCheck(img);
  t.equal(info['virtual-size'], size, 'qemu-img: 2 TiB');
  t.equal(d.size, info['virtual-size'], 'our reader: same size');
  t.same(ours.problems, []);
  t.equal(ours.layout.virtualSize, size);
  t.equal(ours.layout.clusterSize, info['cluster-size']);
  t.equal(ours.layout.allocatedClusters, q['allocated-clusters'], 'allocated clusters agree with qemu-img check');
  t.equal(ours.layout.allocatedClusters, spots.length + 1);
  t.equal(ours.layout.l1Size, 4096, 'L1: 4096 entries of 512 MiB');
  t.equal(ours.layout.fileSize, q['image-end-offset'], 'file end agrees with qemu-img check');
  const ioArgs = ['-f', 'qcow2', '-r'];
  const buf = Buffer.alloc(cs);
  let ok = true;
  for (let i = 0; i < spots.length; i++) {
    await d.read(buf, spots[i]);
    if (!buf.equals(Buffer.alloc(cs, 0x11 * (i + 1)))) ok = false;
    ioArgs.push('-c', `read -P 0x${(0x11 * (i + 1)).toString(16)} ${spots[i]} ${cs}`);
  }
  t.ok(ok, 'our reader: every written cluster');
  const odd = Buffer.alloc(cs);
  await d.read(odd, 2 ** 35);
  t.ok(isAllZero(odd.subarray(0, 3 * 512)) && odd.subarray(3 * 512, 3 * 512 + 2048).equals(Buffer.alloc(2048, 0xee)) && isAllZero(odd.subarray(3 * 512 + 2048)), 'partial cluster: zeros around the write');
  ioArgs.push('-c', `read -P 0 ${2 ** 35} ${3 * 512}`, '-c', `read -P 0xee ${oddAt} 2048`, '-c', `read -P 0 ${oddAt + 2048} ${cs - 3 * 512 - 2048}`);
  const rand = prng(99);
  let zeros = true;
  for (let i = 0; i < 12; i++) {
    const at = Number(rand(8).readBigUInt64LE(0) % BigInt(size / cs - 1)) * cs;
    if (spots.some((s) => Math.abs(s - at) < cs) || Math.abs(at - 2 ** 35) < cs) continue;
    await d.read(buf, at);
    if (!isAllZero(buf)) zeros = false;
    ioArgs.push('-c', `read -P 0 ${at} ${cs}`);
  }
  t.ok(zeros, 'our reader: unwritten clusters read as zeros');
  const io = await runTool('qemu-io', [...ioArgs, img]);
  t.equal(io.code, 0, 'qemu-io reads every pattern');
  t.notMatch(io.stdout + io.stderr, /Pattern verification failed/, 'qemu-io: no pattern mismatch');
  t.same(
    await d.allocated(),
    [...spots.map((s) => ({ offset: s, length: cs })), { offset: 2 ** 35, length: cs }]
      .sort((a, b) => a.offset - b.offset)
      .reduce<ByteRange[]>((acc, r) => {
        const last = acc[acc.length - 1];
        if (last && last.offset + last.length === r.offset) last.length += r.length;
        else acc.push({ ...r });
        return acc;
      }, []),
    'allocated(): the written clusters',
  );
  await d.close();
});

/** A raw that compresses in places: text, runs, random, zeros, per 64 KiB. */
async function makeMixedRaw(path: string, size: number, seed: number): Promise<void> {
  const rand = prng(seed);
  const buf = Buffer.alloc(size);
  const text = Buffer.from('imagekeep qcow2 reference text, line after line; ');
  for (let at = 0; at < size; at += 64 * KiB) {
    const kind = rand(1)[0] % 4;
    const n = Math.min(64 * KiB, size - at);
    if (kind === 0) for (let i = 0; i < n; i++) buf[at + i] = text[(at + i) % text.length];
    else if (kind === 1) rand(n).copy(buf, at);
    else if (kind === 2) buf.fill(rand(1)[0], at + 512, at + n - 512);
  }
  await writeFile(path, buf);
}

t.test('reader: images made by qemu-img read like qemu-img convert -O raw', async (t) => {
  const raw = join(work, 'mixed.raw');
  await makeMixedRaw(raw, 12 * MiB + 3 * 512, 5);
  const cases: [string, string[]][] = [
    ['compat 0.10 (v2)', ['-o', 'compat=0.10']],
    ['compat 1.1', ['-o', 'compat=1.1']],
    ['compressed (zlib)', ['-c']],
    ['compressed (zstd)', ['-c', '-o', 'compression_type=zstd']],
    ['compressed v2', ['-c', '-o', 'compat=0.10']],
    ['4 KiB clusters', ['-o', 'cluster_size=4096']],
    ['2 MiB clusters', ['-o', 'cluster_size=2M']],
    ['512 B clusters, 8-bit refcounts', ['-o', 'cluster_size=512,refcount_bits=8']],
  ];
  for (const [label, opts] of cases) {
    const img = join(work, `qemu-${label.replace(/\W+/g, '_')}.qcow2`);
    await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ...opts, raw, img]);
    const ref = `${img}.raw`;
    await qemuToRaw(img, 'qcow2', ref);
    const d = await openImage(img);
    try {
      t.equal(await firstDifference(d, ref, 3 * MiB + 512), -1, `${label}: whole image = qemu's reading`);
      t.ok(await randomReadsMatch(d, ref, 11, 40), `${label}: random reads`);
      t.ok(await holesAreZero(await d.allocated(), ref), `${label}: everything outside allocated() is zero`);
    } finally {
      await d.close();
    }
    const ours = await ourCheck(img);
    t.same(ours.problems, [], `${label}: our check agrees the image is sound`);
  }
  // qemu-img create (empty) reads as zeros.
  const empty = join(work, 'empty.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', empty, '10M']);
  const d = await openImage(empty);
  const all = Buffer.alloc(10 * MiB, 1);
  await d.read(all, 0);
  t.ok(isAllZero(all), 'empty image reads zeros');
  t.same(await d.allocated(), []);
  await d.close();
});

t.test('reader: backing chains (qcow2 and raw), zero clusters hiding backing data', async (t) => {
  const baseRaw = join(work, 'chain-base.raw');
  await makeScatteredRaw(baseRaw, 32 * MiB, { seed: 3, count: 60 });
  const base = join(work, 'chain-base.qcow2');
  await qemuConvert(baseRaw, base, 'qcow2');
  const mid = join(work, 'chain-mid.qcow2');
  const top = join(work, 'chain-top.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', '-b', 'chain-base.qcow2', '-F', 'qcow2', mid]);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -z 8M 2M', '-c', 'write -P 0x33 12800 1024', mid]);
  // The top layer adds its own data and zeros over both lower layers.
  await must('qemu-img', ['create', '-f', 'qcow2', '-b', 'chain-mid.qcow2', '-F', 'qcow2', top]);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -z 0 64k', '-c', 'write -P 0x77 2M 512', '-c', 'write -z 20M 4M', top]);
  const ref = join(work, 'chain-top.raw');
  await qemuToRaw(top, 'qcow2', ref);
  const d = await openImage(top);
  t.equal(await firstDifference(d, ref), -1, 'three-layer chain = qemu-img convert');
  t.ok(await randomReadsMatch(d, ref, 21), 'random reads through the chain');
  t.ok(await holesAreZero(await d.allocated(), ref), 'outside allocated() is zero');
  await d.close();

  // A raw backing file, larger than nothing and smaller than the overlay.
  const rawBase = join(work, 'rawbase.raw');
  await makeScatteredRaw(rawBase, 8 * MiB + 512, { seed: 4, count: 20 });
  const over = join(work, 'rawover.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', '-b', 'rawbase.raw', '-F', 'raw', over, '16M']);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 4M 64k', '-c', 'write -z 6M 64k', over]);
  const overRef = join(work, 'rawover.raw');
  await qemuToRaw(over, 'qcow2', overRef);
  const o = await openImage(over);
  t.equal(o.size, 16 * MiB);
  t.equal(await firstDifference(o, overRef), -1, 'raw backing smaller than the overlay = qemu-img convert');
  await o.close();

  // A missing backing file is a broken chain, said plainly.
  const orphan = join(work, 'orphan.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', orphan, '1M']);
  await t.rejects(openImage(orphan), ChainBrokenError, 'missing backing file');
  // A file that backs itself.
  const loop = join(work, 'loop.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', 'loop.qcow2', '-F', 'qcow2', loop, '1M']);
  await t.rejects(openImage(loop), ChainBrokenError, 'self-backing file');
});

// ---- growing in place ----

interface WriteOp {
  at: number;
  data: Buffer;
}

/**
 * Random 512-aligned writes: random bytes, all zeros (whole clusters and parts), one repeated
 * byte, single sectors; some cluster-aligned, most not.
 */
function randomOps(seed: number, size: number, count: number, cs: number): WriteOp[] {
  const rand = prng(seed);
  const ops: WriteOp[] = [];
  for (let i = 0; i < count; i++) {
    const r = rand(12);
    const kind = r[0] % 6;
    let len = 512 * (1 + (r.readUInt32LE(4) % 384)); // up to 192 KiB
    if (kind === 4) len = 512;
    let at = 512 * (r.readUInt32LE(8) % (size / 512));
    if (kind === 5) at = Math.floor(at / cs) * cs;
    len = Math.min(len, size - at);
    const data = kind === 1 || kind === 5 && r[1] % 2 === 0 ? Buffer.alloc(len) : kind === 2 ? Buffer.alloc(len, r[2] | 1) : rand(len);
    ops.push({ at, data });
  }
  return ops;
}

async function applyToRaw(raw: string, ops: WriteOp[]): Promise<void> {
  const fh = await open(raw, 'r+');
  try {
    for (const op of ops) await fh.write(op.data, 0, op.data.length, op.at);
  } finally {
    await fh.close();
  }
}

/** Sessions of random writes into `img` (mirrored into `ref`), each closed; reads through the writer checked on the way. */
async function growSessions(t: Test, img: string, ref: string, sessions: number, perSession: number, seed: number): Promise<void> {
  const size = (await stat(ref)).size;
  for (let s = 0; s < sessions; s++) {
    const w = await openWritable(img);
    const cs = Number((await ourCheck(img)).layout.clusterSize);
    const ops = randomOps(seed * 100 + s, size, perSession, cs);
    for (const op of ops) await w.write(op.data, op.at);
    await applyToRaw(ref, ops);
    // The writer's view, pending metadata included, before anything is flushed.
    const rawBytes = await readFile(ref);
    let same = true;
    for (const op of ops.slice(-10)) {
      const back = Buffer.alloc(op.data.length + 1024);
      const from = Math.max(0, op.at - 512);
      const n = Math.min(back.length, size - from);
      await w.read(back.subarray(0, n), from);
      if (!back.subarray(0, n).equals(rawBytes.subarray(from, from + n))) same = false;
    }
    t.ok(same, `session ${s + 1}: the writer reads back what was written`);
    await w.close();
  }
}

async function assertSameAsRaw(t: Test, img: string, ref: string, label: string): Promise<void> {
  t.equal((await qemuCompare(ref, img, 'qcow2')).code, 0, `${label}: qemu-img compare identical`);
  const check = await qemuCheck(img, 'qcow2');
  t.equal(check.code, 0, `${label}: qemu-img check rc 0 (no leaks, no errors): ${check.stdout.replace(/\s+/g, ' ')}`);
  const ours = await ourCheck(img);
  t.same(ours.problems, [], `${label}: our check clean`);
  const d = await openImage(img);
  try {
    t.equal(await firstDifference(d, ref), -1, `${label}: our reader = raw`);
  } finally {
    await d.close();
  }
}

t.test('grow in place: our image with 4 KiB clusters over four sessions', async (t) => {
  const size = 48 * MiB;
  const img = join(work, 'grow.qcow2');
  const ref = join(work, 'grow.raw');
  await writeFile(ref, '');
  await truncate(ref, size);
  await (await create(img, size, 4096)).close();
  await growSessions(t, img, ref, 4, 70, 1);
  await assertSameAsRaw(t, img, ref, 'after 4 sessions');
  const ours = await ourCheck(img);
  t.ok(Number(ours.layout.refcountBlocks) >= 2, `a second refcount block was needed (${ours.layout.refcountBlocks})`);
  t.ok(Number(ours.layout.l2Tables) >= 8, `several L2 tables (${ours.layout.l2Tables})`);
  t.equal((await libyalCompare(img, ref)).code, 0, 'libqcow reads it identically');
});

t.test('grow in place: qemu images (512 B clusters needing a bigger refcount table; v2 compressed over a backing file)', async (t) => {
  // 512 B clusters: qemu's one-cluster refcount table covers 64 blocks of 256 clusters (8 MiB of file).
  const small = join(work, 'qemu-small.qcow2');
  const smallRef = join(work, 'qemu-small.raw');
  await must('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=512', small, '32M']);
  await writeFile(smallRef, '');
  await truncate(smallRef, 32 * MiB);
  const before = await ourCheck(small);
  await growSessions(t, small, smallRef, 3, 80, 2);
  const after = await ourCheck(small);
  t.ok(Number(after.layout.fileSize) > 8 * MiB, `file grew past what the first table covers (${after.layout.fileSize})`);
  t.not(after.layout.refcountTableOffset, before.layout.refcountTableOffset, 'the refcount table moved');
  t.ok(Number(after.layout.refcountTableClusters) > Number(before.layout.refcountTableClusters), 'and grew');
  await assertSameAsRaw(t, small, smallRef, '512 B clusters');

  // v2 with a backing file and compressed clusters: copy-on-write from both.
  const baseRaw = join(work, 'cow-base.raw');
  await makeScatteredRaw(baseRaw, 16 * MiB, { seed: 8, count: 40 });
  const base = join(work, 'cow-base.qcow2');
  await qemuConvert(baseRaw, base, 'qcow2');
  const mixed = join(work, 'cow-mixed.raw');
  await makeMixedRaw(mixed, 16 * MiB, 9);
  const top = join(work, 'cow-top.qcow2');
  await must('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10', '-B', 'cow-base.qcow2', '-F', 'qcow2', mixed, top]);
  const topRef = join(work, 'cow-top.raw');
  await qemuToRaw(top, 'qcow2', topRef);
  t.ok(Number((await ourCheck(top)).layout.compressedClusters) > 10, 'the overlay holds compressed clusters');
  await growSessions(t, top, topRef, 2, 60, 3);
  await assertSameAsRaw(t, top, topRef, 'v2 compressed overlay');
  t.equal((await qemuInfo(top, 'qcow2'))['format-specific']?.data.compat, '0.10', 'still compat 0.10');
});

// ---- crash consistency ----

/** A file whose k-th write, truncate or flush does not happen: the process "dies" there and every later call fails. */
class CrashFile implements RandomAccessFile {
  steps = 0;
  dead = false;
  constructor(readonly inner: RandomAccessFile, private readonly crashAt: number) {}
  get path(): string {
    return this.inner.path;
  }
  private step(what: string): void {
    if (this.dead) throw new InjectedCrash(this.steps, `${what} after the crash`);
    this.steps++;
    if (this.steps === this.crashAt) {
      this.dead = true;
      throw new InjectedCrash(this.steps, what);
    }
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  async read(into: Uint8Array, at: number): Promise<void> {
    if (this.dead) throw new InjectedCrash(this.steps, 'read after the crash');
    await this.inner.read(into, at);
  }
  async write(from: Uint8Array, at: number): Promise<void> {
    this.step(`write ${from.length} at ${at}`);
    await this.inner.write(from, at);
  }
  async truncate(size: number): Promise<void> {
    this.step(`truncate ${size}`);
    await this.inner.truncate(size);
  }
  async flush(): Promise<void> {
    this.step('flush');
    await this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Runs `ops` (flushing after `flushAfter` of them) on a copy of `base`, dying at step `crashAt`; returns the steps used. */
async function crashSession(base: string, img: string, ops: WriteOp[], flushAfter: number, crashAt: number): Promise<number> {
  await copyFile(base, img);
  let file: CrashFile | null = null;
  let w: DiskWriter | null = null;
  try {
    w = await openWritable(img, (f) => (file = new CrashFile(f, crashAt)));
    for (let i = 0; i < ops.length; i++) {
      await w.write(ops[i].data, ops[i].at);
      if (i + 1 === flushAfter) await w.flush();
    }
    await w.close();
  } catch (e) {
    if (!(e instanceof InjectedCrash)) throw e;
    // What a killed process leaves: the file as written so far; abort closes the handles (and the backing file's).
    if (w) await w.abort();
    else await (file as CrashFile | null)?.inner.close();
  }
  return (file as CrashFile | null)?.steps ?? 0;
}

/** Each cluster of `now` equals the same cluster of `old` or of `neu`; returns the first offending offset or -1. */
function oldOrNew(now: Buffer, old: Buffer, neu: Buffer, cs: number): number {
  for (let at = 0; at < now.length; at += cs) {
    const a = now.subarray(at, at + cs);
    if (!a.equals(old.subarray(at, at + cs)) && !a.equals(neu.subarray(at, at + cs))) return at;
  }
  return -1;
}

/**
 * Non-overlapping writes, one per sixteenth of the disk: multi-cluster and partial, aligned
 * and not, random data and zeros; on a fresh area each needs new clusters, L2 tables and,
 * with small clusters, new refcount blocks.
 */
function crashOps(size: number, count: number, seed: number): WriteOp[] {
  const rand = prng(seed);
  const stride = size / 16;
  const ops: WriteOp[] = [];
  for (let i = 0; i < count; i++) {
    const at = ((i * 5) % 16) * stride + (i % 3) * 512;
    const len = Math.min((1 + (i % 4)) * 40 * KiB + (i % 2) * 1024, stride - 2048);
    ops.push({ at, data: i % 4 === 3 ? Buffer.alloc(len) : rand(len) });
  }
  return ops;
}

for (const variant of ['ours, 512 B clusters', 'qemu v2, compressed over a backing file'] as const) {
  t.test(`crash at every step of a write session (${variant}): leaks at worst, content old or new`, async (t) => {
    const tag = variant.startsWith('ours') ? 'crash-ours' : 'crash-v2';
    const base = join(work, `${tag}-base.qcow2`);
    let cs: number;
    let size: number;
    if (variant.startsWith('ours')) {
      size = 2 * MiB;
      cs = 512;
      const raw = join(work, `${tag}.raw`);
      const { extents } = await makeScatteredRaw(raw, size, { seed: 12, count: 30, maxLength: 64 * KiB });
      const w = await create(base, size, cs);
      await exportRaw(raw, w, extents, 256 * KiB);
      await w.close();
    } else {
      size = 8 * MiB;
      cs = 65536;
      const lowerRaw = join(work, `${tag}-lower.raw`);
      await makeScatteredRaw(lowerRaw, size, { seed: 13, count: 30 });
      await qemuConvert(lowerRaw, join(work, `${tag}-lower.qcow2`), 'qcow2');
      const mixed = join(work, `${tag}-mixed.raw`);
      await makeMixedRaw(mixed, size, 14);
      await must('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10', '-B', `${tag}-lower.qcow2`, '-F', 'qcow2', mixed, base]);
    }
    const oldRaw = join(work, `${tag}-old.raw`);
    await qemuToRaw(base, 'qcow2', oldRaw);
    const old = await readFile(oldRaw);
    const ops = crashOps(size, 8, 15);
    const neu = Buffer.from(old);
    for (const op of ops) op.data.copy(neu, op.at);
    const img = join(work, `${tag}.qcow2`);
    const flushAfter = 5;
    const total = await crashSession(base, img, ops, flushAfter, Infinity);
    t.ok(total > 20, `the session takes ${total} durable steps`);
    const nowRaw = join(work, `${tag}-now.raw`);
    const codes = new Set<number>();
    const bad: string[] = [];
    for (let k = 1; k <= total; k++) {
      await crashSession(base, img, ops, flushAfter, k);
      const check = await qemuCheck(img, 'qcow2');
      codes.add(check.code);
      if (check.code !== 0 && check.code !== 3) bad.push(`step ${k}: qemu-img check rc ${check.code}: ${check.stdout}${check.stderr}`);
      const ours = await ourCheck(img);
      if (ours.corruptions !== 0) bad.push(`step ${k}: our check: ${ours.problems.join('; ')}`);
      const now = Buffer.alloc(size);
      const seen = await openImage(img);
      await seen.read(now, 0);
      await seen.close();
      const off = oldOrNew(now, old, neu, cs);
      if (off >= 0) bad.push(`step ${k}: cluster at ${off} is neither old nor new`);
      // Carry on writing after the crash: allocation must start past anything counted.
      const w = await openWritable(img);
      const extra = Buffer.alloc(3 * cs, 0x6b);
      const extraAt = size - 4 * cs;
      await w.write(extra, extraAt);
      await w.close();
      const after = await ourCheck(img);
      if (after.corruptions !== 0) bad.push(`step ${k}: after a further session our check finds ${after.problems.join('; ')}`);
      const d = await openImage(img);
      const back = Buffer.alloc(extra.length);
      await d.read(back, extraAt);
      await d.close();
      if (!back.equals(extra)) bad.push(`step ${k}: the write after the crash does not read back`);
    }
    t.same(bad, [], `every one of ${total} crash points: qemu-img check 0 or 3, never 2; content old or new`);
    t.ok(codes.has(0) && codes.has(3), `some crash points leave leaks, some none (qemu-img check codes seen: ${[...codes].join(', ')})`);

    // Abandoned without a flush after j writes: nothing counted, nothing leaked, in-place writes new.
    const abandoned: string[] = [];
    for (const j of [0, 1, 4, ops.length]) {
      await copyFile(base, img);
      const w = await openWritable(img);
      for (const op of ops.slice(0, j)) await w.write(op.data, op.at);
      await w.abort();
      const check = await qemuCheck(img, 'qcow2');
      if (check.code !== 0) abandoned.push(`after ${j} writes: qemu-img check rc ${check.code}`);
      await qemuToRaw(img, 'qcow2', nowRaw);
      const off = oldOrNew(await readFile(nowRaw), old, neu, cs);
      if (off >= 0) abandoned.push(`after ${j} writes: cluster at ${off} is neither old nor new`);
    }
    t.same(abandoned, [], 'abort without flush: check rc 0, content old or new');
  });
}

// ---- bad input ----

/** A copy of `src` with `bytes` written at `at`. */
async function patched(src: string, name: string, at: number, bytes: Buffer): Promise<string> {
  const out = join(work, name);
  await copyFile(src, out);
  const fh = await open(out, 'r+');
  await fh.write(bytes, 0, bytes.length, at);
  await fh.close();
  return out;
}

const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
};
const u64 = (v: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};

/** Opens and reads the whole image; resolves to the error thrown, or null. */
async function failure(path: string): Promise<unknown> {
  try {
    const d = await openImage(path);
    try {
      const buf = Buffer.alloc(Math.min(d.size, 4 * MiB));
      for (let at = 0; at < d.size; at += buf.length) await d.read(buf.subarray(0, Math.min(buf.length, d.size - at)), at);
      await d.allocated();
    } finally {
      await d.close();
    }
    return null;
  } catch (e) {
    return e;
  }
}

t.test('bad input: truncated, bit-flipped, encrypted, foreign, refused for writing', async (t) => {
  const raw = join(work, 'bad-src.raw');
  await makeScatteredRaw(raw, 8 * MiB, { seed: 31, count: 20 });
  const good = join(work, 'bad-good.qcow2');
  await qemuConvert(raw, good, 'qcow2');
  t.equal(await failure(good), null, 'the unharmed image reads');
  const goodSize = (await stat(good)).size;

  const cases: [string, Promise<string>, new (...a: never[]) => Error][] = [
    ['truncated to 50 bytes', copyFile(good, join(work, 'trunc50.qcow2')).then(() => truncate(join(work, 'trunc50.qcow2'), 50)).then(() => join(work, 'trunc50.qcow2')), CorruptImageError],
    ['truncated to 100 bytes (v3 header is 104)', copyFile(good, join(work, 'trunc100.qcow2')).then(() => truncate(join(work, 'trunc100.qcow2'), 100)).then(() => join(work, 'trunc100.qcow2')), CorruptImageError],
    ['truncated inside the L1 table', copyFile(good, join(work, 'truncl1.qcow2')).then(() => truncate(join(work, 'truncl1.qcow2'), 3 * 65536 + 4)).then(() => join(work, 'truncl1.qcow2')), CorruptImageError],
    ['truncated before its last data clusters', copyFile(good, join(work, 'truncdata.qcow2')).then(() => truncate(join(work, 'truncdata.qcow2'), goodSize - 5 * 65536)).then(() => join(work, 'truncdata.qcow2')), CorruptImageError],
    ['version 4', patched(good, 'v4.qcow2', 4, u32(4)), UnsupportedVersionError],
    ['cluster_bits 30', patched(good, 'cb30.qcow2', 20, u32(30)), CorruptImageError],
    ['size 2^60 (L1 too small)', patched(good, 'huge.qcow2', 24, u64(1n << 60n)), CorruptImageError],
    ['L1 offset unaligned', patched(good, 'l1odd.qcow2', 40, u64(0x30000n + 8n)), CorruptImageError],
    ['L1 offset past the end', patched(good, 'l1far.qcow2', 40, u64(1n << 40n)), CorruptImageError],
    ['refcount table too large', patched(good, 'rtbig.qcow2', 56, u32(1 << 20)), CorruptImageError],
    ['refcount_order 9', patched(good, 'ro9.qcow2', 96, u32(9)), CorruptImageError],
    ['header_length 7', patched(good, 'hl7.qcow2', 100, u32(7)), CorruptImageError],
    ['unknown incompatible feature bit 9', patched(good, 'inc9.qcow2', 72, u64(1n << 9n)), UnsupportedVersionError],
    ['corrupt bit', patched(good, 'corrupt.qcow2', 72, u64(2n)), CorruptImageError],
    ['external data file bit', patched(good, 'datafile.qcow2', 72, u64(4n)), UnsupportedVersionError],
    ['extended L2 bit', patched(good, 'extl2.qcow2', 72, u64(16n)), UnsupportedVersionError],
    ['crypt_method 2 (LUKS)', patched(good, 'luks.qcow2', 32, u32(2)), UnsupportedVersionError],
    ['L1 entry unaligned', patched(good, 'l1e.qcow2', 0x30000, u64(0x8000000000040200n)), CorruptImageError],
    ['L1 entry past the end', patched(good, 'l1e2.qcow2', 0x30000, u64(0x8000010000000000n)), CorruptImageError],
    ['header extension overflowing cluster 0', patched(good, 'ext.qcow2', 112, Buffer.concat([u32(0x12345678), u32(70000)])), CorruptImageError],
    ['backing file name too long', patched(good, 'bfl.qcow2', 8, Buffer.concat([u64(512n), u32(5000)])), CorruptImageError],
  ];
  for (const [label, made, kind] of cases) {
    const path = await made;
    const e = await failure(path);
    t.type(e, kind, `${label}: ${kind.name}`);
    if (e instanceof Error) t.ok(e.message.length > 20 && !/undefined|NaN/.test(e.message), `${label}: says what is wrong (${e.message})`);
    // Our check does not throw on these and names a problem.
    const ours = await ourCheck(path);
    t.ok(ours.problems.length > 0, `${label}: our check reports it (${ours.problems[0]})`);
  }

  // A data cluster pointing past the end: L2 of the first 512 MiB holds the first cluster's entry.
  const l2At = Number((await readFile(good)).readBigUInt64BE(0x30000) & 0x00fffffffffffe00n);
  const l2past = await patched(good, 'l2past.qcow2', l2At, u64(0x8000000100000000n));
  t.type(await failure(l2past), CorruptImageError, 'L2 entry past the end of the file');
  const report = await ourCheck(l2past);
  t.ok(report.corruptions > 0 && report.problems.some((p) => /past the end/.test(p)), 'our check reports the L2 entry');
  t.equal((await qemuCheck(l2past, 'qcow2')).code, 2, 'and qemu-img check calls it corrupt too');

  // Two guest clusters sharing one host cluster (no snapshots): a write to one would change the other.
  const first = (await readFile(good)).subarray(l2At, l2At + 8);
  const twice = await patched(good, 'twice.qcow2', l2At + 8, Buffer.from(first));
  const tr = await ourCheck(twice);
  t.ok(tr.problems.some((p) => /used 2 times/.test(p)), `our check: a cluster used twice (${tr.problems.find((p) => /used 2 times/.test(p))})`);
  t.equal((await qemuCheck(twice, 'qcow2')).code, 2, 'qemu-img check: corrupt');

  // Refcount mistakes: a leak (refcount too high) and a corruption (too low), told apart like qemu-img check does.
  const rtAt = Number((await readFile(good)).readBigUInt64BE(48));
  const rbAt = Number((await readFile(good)).readBigUInt64BE(rtAt));
  const spare = Math.ceil(goodSize / 65536); // a cluster past the current end, counted but unused
  const leakTail = await patched(good, 'leak.qcow2', rbAt + 2 * spare, Buffer.from([0, 1]));
  await truncate(leakTail, (spare + 1) * 65536);
  const lr = await ourCheck(leakTail);
  t.equal(lr.leaks, 1, 'our check: one leaked cluster');
  t.equal(lr.corruptions, 0);
  t.equal((await qemuCheck(leakTail, 'qcow2')).code, 3, 'qemu-img check: leaks only');
  const low = await patched(good, 'low.qcow2', rbAt + 2 * 3, Buffer.from([0, 0]));
  const lo = await ourCheck(low);
  t.ok(lo.corruptions > 0, `our check: refcount too low is a corruption (${lo.problems[0]})`);
  t.equal((await qemuCheck(low, 'qcow2')).code, 2, 'qemu-img check: corrupt');

  // Encrypted by qemu-img (AES; LUKS needs seconds of key derivation, the patched header above covers it).
  const enc = join(work, 'enc.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', '--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', enc, '4M']);
  const ee = await failure(enc);
  t.type(ee, UnsupportedVersionError, 'AES-encrypted qcow2 is refused');
  t.match((ee as Error).message, /encrypted/);
  t.equal((await ourCheck(enc)).layout.encrypted, true, 'check still describes it');

  // Foreign bytes.
  const foreign: [string, Buffer][] = [
    ['random bytes', prng(5)(65536)],
    ['zeros', Buffer.alloc(4096)],
    ['a VHD footer', Buffer.concat([Buffer.from('conectix'), Buffer.alloc(504)])],
    ['an empty file', Buffer.alloc(0)],
  ];
  for (const [label, bytes] of foreign) {
    const f = new MemoryFile(label, bytes);
    await t.rejects(qcow2Driver.open(f, async () => f), ForeignFormatError, `${label}: ForeignFormatError`);
    await t.rejects(qcow2Driver.check(f, async () => f), ForeignFormatError, `${label}: check says foreign too`);
    t.equal(qcow2Driver.probe(bytes.subarray(0, 65536), bytes.subarray(-512)), 0, `${label}: probe 0`);
  }

  // Refused for writing, readable.
  const dirty = await patched(good, 'dirty.qcow2', 72, u64(1n));
  t.equal(await failure(dirty), null, 'a dirty image reads (only refcounts are stale)');
  await t.rejects(openWritable(dirty), UsageError, 'but is not grown in place');
  const snap = join(work, 'snap.qcow2');
  await copyFile(good, snap);
  await must('qemu-img', ['snapshot', '-c', 'first', snap]);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3c 0 128k', snap]);
  const snapRef = join(work, 'snap.raw');
  await qemuToRaw(snap, 'qcow2', snapRef);
  const sd = await openImage(snap);
  t.equal(await firstDifference(sd, snapRef), -1, 'an image with a snapshot reads its active state');
  await sd.close();
  t.same((await ourCheck(snap)).problems, [], 'our check counts the snapshot clusters (no false leaks)');
  await t.rejects(openWritable(snap), UsageError, 'images with snapshots are not grown in place');

  // Writer arguments.
  await t.rejects(create(join(work, 'odd.qcow2'), 1000), UsageError, 'size not a multiple of 512');
  await t.rejects(create(join(work, 'odd.qcow2'), MiB, 3000), UsageError, 'cluster size not a power of two');
  const w = await create(join(work, 'args.qcow2'), MiB);
  await t.rejects(w.write(Buffer.alloc(512), 100), UsageError, 'unaligned write');
  await t.rejects(w.write(Buffer.alloc(1024), MiB - 512), UsageError, 'write past the end');
  await w.close();
});

t.test('fuzz: mutated headers and tables give typed errors, never a crash or a hang', async (t) => {
  const raw = join(work, 'fuzz.raw');
  await makeScatteredRaw(raw, 4 * MiB, { seed: 41, count: 10, maxLength: 8 * KiB });
  const src = join(work, 'fuzz.qcow2');
  await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, src]);
  const original = await readFile(src);
  const rand = prng(42);
  const untyped: string[] = [];
  for (let i = 0; i < 200; i++) {
    const bytes = Buffer.from(original);
    const r = rand(16);
    const flips = 1 + (r[0] % 4);
    for (let k = 0; k < flips; k++) {
      // Mostly the header and first tables, sometimes anywhere.
      const span = r[1] % 4 === 0 ? bytes.length : 5 * 4096;
      const at = r.readUInt32LE(4 + 4 * (k % 3)) % span;
      bytes[at] ^= 1 << (r[2 + k] % 8);
    }
    const f = new MemoryFile(`fuzz-${i}`, bytes);
    const opener: FileOpener = async (name) => {
      throw new Error(`no file ${name}`);
    };
    try {
      const d = await qcow2Driver.open(f, opener);
      const buf = Buffer.alloc(d.size > 0 ? Math.min(d.size, MiB) : 0);
      await d.read(buf, 0);
      await d.allocated();
      await d.close();
    } catch (e) {
      if (!(e instanceof ImagekeepError)) untyped.push(`mutation ${i}: ${(e as Error).stack?.split('\n').slice(0, 2).join(' ')}`);
    }
    try {
      await qcow2Driver.check(f, opener);
    } catch (e) {
      if (!(e instanceof ImagekeepError)) untyped.push(`check ${i}: ${(e as Error).stack?.split('\n').slice(0, 2).join(' ')}`);
    }
  }
  t.same(untyped, [], '200 mutations: only imagekeep errors');
});
