// Proves VHDX disks we write (1 GiB scattered, odd sizes, the chunk interleave past 4 GiB, 2 TiB sparse, grown in place over sessions) are read byte-exactly by qemu-img and libvhdi and pass their checks and ours; we read qemu's, the fixture's and a dirty-log VHDX exactly (replaying the log in memory, file untouched); bad input gives typed errors.
import t, { type Test } from 'tap';
import { open, readFile, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { MemoryFile } from '../src/formats/memory-file.js';
import { LocalFile } from '../src/formats/local-file.js';
import type { DiskImage, DiskWriter, FileOpener } from '../src/formats/disk-image.js';
import { CorruptImageError, ForeignFormatError, ImagekeepError, UnsupportedVersionError, UsageError } from '../src/formats/errors.js';
import { vhdxDriver } from '../src/formats/vhdx/index.js';
import { crc32c } from '../src/formats/vhdx/crc32c.js';
import {
  HEADER_OFFSETS,
  HEADER_SIZE,
  MiB,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  ZERO_GUID,
  batFileOffset,
  batState,
  findActiveLogSequence,
  guidFromString,
  parseHeader,
  payloadBatIndex,
  serializeLogEntry,
  type VhdxHeader,
} from '../src/formats/vhdx/codec.js';
import {
  MKVHDX_FIXTURE,
  libyalCompare,
  libyalInfo,
  makeScatteredRaw,
  qemuCheck,
  qemuCompare,
  qemuConvert,
  qemuInfo,
  qemuToRaw,
  runTool,
  type ToolResult,
} from './helpers/disk-tools.js';
import { patchFile, prng, readFileAt, sha256File, tempDir } from './helpers/cli.js';

const GiB = 1024 * MiB;
const { dir, cleanup } = await tempDir('vhdx');
t.teardown(cleanup);

const noOpener: FileOpener = async (name) => {
  throw new Error(`a dynamic VHDX opens no other file (asked for ${name})`);
};

async function openImage(path: string): Promise<DiskImage> {
  const f = await LocalFile.open(path, 'r');
  try {
    return await vhdxDriver.open(f, noOpener);
  } catch (e) {
    await f.close();
    throw e;
  }
}

async function checkFile(path: string) {
  const f = await LocalFile.open(path, 'r');
  try {
    return await vhdxDriver.check(f, noOpener);
  } finally {
    await f.close();
  }
}

function ok(tt: Test, r: ToolResult, what: string): void {
  tt.equal(r.code, 0, `${what}${r.code === 0 ? '' : `: ${r.stdout.trim()} ${r.stderr.trim()}`}`);
}

function fixture(out: string, raw: string, ...args: string[]): Promise<ToolResult> {
  return runTool('/usr/bin/python3', [MKVHDX_FIXTURE, out, raw, ...args]);
}

/** Byte ranges of a scattered raw rounded out to 1 MiB and merged: what an exporter that skips holes writes. */
function windows(extents: { offset: number; length: number }[], size: number): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (const e of extents) {
    const start = Math.floor(e.offset / MiB) * MiB;
    const end = Math.min(size, Math.ceil((e.offset + e.length) / MiB) * MiB);
    const last = out[out.length - 1];
    if (last && start <= last.offset + last.length) last.length = Math.max(last.length, end - last.offset);
    else out.push({ offset: start, length: end - start });
  }
  return out;
}

/** Copies the data ranges of `raw` into a new VHDX through our writer, in ascending writes of up to 4 MiB. */
async function exportRaw(raw: string, out: string, size: number, extents: { offset: number; length: number }[], blockSize?: number): Promise<void> {
  const src = await open(raw, 'r');
  const w = await vhdxDriver.create!(await LocalFile.open(out, 'w'), noOpener, { size, finalName: out, blockSize });
  try {
    for (const win of windows(extents, size)) {
      for (let at = win.offset; at < win.offset + win.length; at += 4 * MiB) {
        const buf = Buffer.alloc(Math.min(4 * MiB, win.offset + win.length - at));
        await src.read(buf, 0, buf.length, at);
        await w.write(buf, at);
      }
    }
    await w.close();
  } finally {
    await src.close();
  }
}

/** Our reader against the raw file: whole disk in 8 MiB steps, then odd-sized reads at odd offsets. */
async function readsLikeRaw(tt: Test, img: DiskImage, raw: string, seed: number): Promise<void> {
  const src = await open(raw, 'r');
  try {
    const size = (await src.stat()).size;
    tt.equal(img.size, size, 'virtual size');
    let firstDiff = -1;
    const a = Buffer.alloc(8 * MiB);
    const b = Buffer.alloc(8 * MiB);
    for (let at = 0; at < size && firstDiff < 0; at += a.length) {
      const n = Math.min(a.length, size - at);
      await img.read(a.subarray(0, n), at);
      await src.read(b, 0, n, at);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) firstDiff = at;
    }
    tt.equal(firstDiff, -1, 'our reader returns the raw bytes');
    const rand = prng(seed);
    let bad = 0;
    for (let i = 0; i < 40; i++) {
      const r = rand(8);
      const len = 1 + (r.readUInt16LE(0) % (3 * 65536));
      const at = Math.min(size - len, Number(r.readBigUInt64LE(0) % BigInt(size)));
      const x = Buffer.alloc(len);
      const y = Buffer.alloc(len);
      await img.read(x, at);
      await src.read(y, 0, len, at);
      if (!x.equals(y)) bad++;
    }
    tt.equal(bad, 0, 'unaligned reads match');
  } finally {
    await src.close();
  }
}

/** Every independent verdict on a VHDX we wrote from `raw`. */
async function acceptedByTools(tt: Test, vhdx: string, raw: string, size: number): Promise<void> {
  ok(tt, await qemuCompare(raw, vhdx, 'vhdx'), 'qemu-img compare: identical');
  ok(tt, await qemuCheck(vhdx, 'vhdx'), 'qemu-img check: clean');
  const info = await qemuInfo(vhdx, 'vhdx');
  tt.equal(info.format, 'vhdx', 'qemu-img info: format vhdx');
  tt.equal(info['virtual-size'], size, 'qemu-img info: exact size');
  const vi = await libyalInfo(vhdx, 'vhdx');
  ok(tt, vi, 'vhdiinfo parses');
  tt.match(vi.stdout, new RegExp(`Media size\\s*:.*\\(${size} bytes\\)`), 'vhdiinfo: media size');
  ok(tt, await libyalCompare(vhdx, raw), 'libvhdi reads identical bytes');
  const report = await checkFile(vhdx);
  tt.same(report.problems, [], 'our check: no problems');
  tt.equal((await stat(vhdx)).size % MiB, 0, 'file length is a whole number of MiB');
}

async function headersOf(path: string): Promise<VhdxHeader[]> {
  const buf = await readFile(path);
  return HEADER_OFFSETS.map((o) => {
    const h = parseHeader(buf.subarray(o, o + HEADER_SIZE));
    if (!h.ok) throw new Error(`header at ${o}: ${h.reason}`);
    return h.value;
  });
}



t.test('CRC-32C is Castagnoli, not zlib', async (t) => {
  t.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  t.equal(crc32c(Buffer.alloc(0)), 0);
});

t.test('1 GiB with scattered data, and a size of no block multiple (1 GiB + 7 sectors)', async (t) => {
  for (const [name, size] of [['a', GiB], ['b', GiB + 7 * 512]] as const) {
    const raw = join(dir, `${name}.raw`);
    const vhdx = join(dir, `${name}.vhdx`);
    const disk = await makeScatteredRaw(raw, size, { seed: size % 1000 });
    await exportRaw(raw, vhdx, size, disk.extents);
    await acceptedByTools(t, vhdx, raw, size);
    const report = await checkFile(vhdx);
    t.equal(report.layout.blockSize, 32 * MiB, 'default block size 32 MiB');
    t.equal(report.layout.chunkRatio, 128);
    t.equal(report.layout.logGuidZero, true);
    t.equal(report.layout.physicalSectorSize, 4096);
    const img = await openImage(vhdx);
    await readsLikeRaw(t, img, raw, 7);
    // allocated() covers every data extent, and nothing is allocated for zeros.
    const alloc = await img.allocated();
    const covered = (o: number, l: number) => alloc.some((a) => a.offset <= o && o + l <= a.offset + a.length);
    t.ok(disk.extents.every((e) => covered(e.offset, e.length)), 'allocated() covers every data extent');
    const allocatedBytes = alloc.reduce((n, a) => n + a.length, 0);
    t.equal(allocatedBytes, (report.layout.allocatedBlocks as number) * 32 * MiB - (name === 'b' ? 32 * MiB - 7 * 512 : 0));
    await img.close();
  }
});

t.test('the chunk interleave: 1 MiB blocks (ratio 4096) with data past 4 GiB', async (t) => {
  const size = 4 * GiB + 64 * MiB;
  const raw = join(dir, 'il.raw');
  const vhdx = join(dir, 'il.vhdx');
  const disk = await makeScatteredRaw(raw, size, { seed: 41, count: 60, maxLength: 64 * 1024 });
  // Make sure blocks on both sides of the first sector-bitmap slot hold data.
  const fh = await open(raw, 'r+');
  const rand = prng(42);
  for (const at of [4 * GiB - MiB, 4 * GiB, 4 * GiB + MiB, 4 * GiB + 17 * MiB]) {
    await fh.write(rand(64 * 1024), 0, 64 * 1024, at + 4096);
    disk.extents.push({ offset: at + 4096, length: 64 * 1024 });
  }
  await fh.close();
  disk.extents.sort((a, b) => a.offset - b.offset);
  await exportRaw(raw, vhdx, size, disk.extents, MiB);
  const report = await checkFile(vhdx);
  t.equal(report.layout.chunkRatio, 4096);
  t.equal(report.layout.batEntries, 4160 + 1, 'one sector-bitmap entry between chunk 0 and chunk 1');
  // Payload block 4096 (the first at 4 GiB) sits at BAT index 4097; index 4096 is the empty sector-bitmap slot.
  const batOffset = report.layout.batOffset as number;
  const bat = await readFileAt(vhdx, batOffset, 4161 * 8);
  t.equal(payloadBatIndex(4096, 4096), 4097);
  t.equal(batState(bat, 4096), 0, 'sector-bitmap slot is empty');
  t.equal(batState(bat, 4097), 6, 'block 4096 is present at index 4097');
  t.equal(batState(bat, 4095), 6, 'block 4095 is present at index 4095');
  await acceptedByTools(t, vhdx, raw, size);
  const img = await openImage(vhdx);
  for (const e of disk.extents.filter((x) => x.offset > 4 * GiB - 2 * MiB)) {
    const a = Buffer.alloc(e.length);
    const b = await readFileAt(raw, e.offset, e.length);
    await img.read(a, e.offset);
    if (!a.equals(b)) t.fail(`extent at ${e.offset} differs`);
  }
  await img.close();
});

t.test('256 MiB blocks (ratio 16): payload block 16 at BAT index 17, checked by qemu-io patterns', async (t) => {
  const size = 4 * GiB + 512 * MiB;
  const vhdx = join(dir, 'big256.vhdx');
  const w = await vhdxDriver.create!(await LocalFile.open(vhdx, 'w'), noOpener, { size, finalName: vhdx, blockSize: 256 * MiB });
  const marks = [
    { block: 15, byte: 0x15 },
    { block: 16, byte: 0x16 },
    { block: 17, byte: 0x17 },
  ];
  for (const m of marks) await w.write(Buffer.alloc(MiB, m.byte), m.block * 256 * MiB + 3 * MiB);
  await w.close();
  const cmds = marks.flatMap((m) => ['-c', `read -P 0x${m.byte.toString(16)} ${m.block * 256 * MiB + 3 * MiB} ${MiB}`, '-c', `read -P 0 ${m.block * 256 * MiB} ${3 * MiB}`]);
  const r = await runTool('qemu-io', ['-r', '-f', 'vhdx', ...cmds, vhdx]);
  t.equal(r.code, 0, 'qemu-io ran');
  t.notMatch(r.stdout + r.stderr, /Pattern verification failed|error/i, 'qemu reads each block where we put it');
  const bat = await readFileAt(vhdx, (await checkFile(vhdx)).layout.batOffset as number, 19 * 8);
  t.same([15, 16, 17, 18].map((i) => batState(bat, i)), [6, 0, 6, 6], 'index 16 is the sector-bitmap slot');
  t.same((await checkFile(vhdx)).problems, []);
  // The mistake qemu-img check misses: payload entries written without the interleave.
  const batOffset = (await checkFile(vhdx)).layout.batOffset as number;
  const flat = Buffer.alloc(3 * 8);
  bat.copy(flat, 0, 17 * 8, 19 * 8);
  await patchFile(vhdx, batOffset + 16 * 8, flat);
  ok(t, await qemuCheck(vhdx, 'vhdx'), 'qemu-img check does not notice a missing interleave');
  t.match((await checkFile(vhdx)).problems.join(' '), /sector-bitmap slot of chunk 0 .* not interleaved/, 'our check does');
  const wrong = await runTool('qemu-io', ['-r', '-f', 'vhdx', ...cmds, vhdx]);
  t.match(wrong.stdout + wrong.stderr, /Pattern verification failed/, 'and the content really is wrong');
});

t.test('a 2 TiB disk holding a few blocks', async (t) => {
  const size = 2 * 1024 * GiB;
  const vhdx = join(dir, 'huge.vhdx');
  const bs = 32 * MiB;
  const w = await vhdxDriver.create!(await LocalFile.open(vhdx, 'w'), noOpener, { size, finalName: vhdx });
  const blocks = [0, 127, 128, 40000, 65535].map((block, i) => ({ block, byte: 0x21 + i }));
  for (const b of blocks) {
    for (let at = 0; at < bs; at += 4 * MiB) await w.write(Buffer.alloc(4 * MiB, b.byte), b.block * bs + at);
  }
  await w.close();

  const info = await qemuInfo(vhdx, 'vhdx');
  const report = await checkFile(vhdx);
  t.same(report.problems, []);
  t.equal(info['virtual-size'], size, 'qemu-img info size');
  t.equal(report.layout.virtualSize, size, 'our size agrees');
  t.equal(info['cluster-size'], report.layout.blockSize, 'block size agrees with qemu');
  t.equal(report.layout.chunkRatio, 128);
  t.equal(report.layout.batEntries, 65536 + 511);
  t.equal(report.layout.allocatedBlocks, blocks.length);
  ok(t, await qemuCheck(vhdx, 'vhdx'), 'qemu-img check: clean');
  for (const k of ['logOffset', 'logLength', 'batOffset', 'batLength', 'metadataOffset', 'metadataLength', 'fileSize']) {
    t.equal((report.layout[k] as number) % MiB, 0, `${k} is 1 MiB-aligned`);
  }
  const bat = await readFileAt(vhdx, report.layout.batOffset as number, (65536 + 511) * 8);
  for (const b of blocks) {
    const off = batFileOffset(bat, payloadBatIndex(b.block, 128));
    t.equal(off % MiB, 0, `block ${b.block} at a 1 MiB-aligned offset`);
  }
  t.equal((await stat(vhdx)).size, 4 * MiB + blocks.length * bs, 'file holds the structures and the written blocks only');

  const img = await openImage(vhdx);
  const rand = prng(5);
  const cmds: string[] = [];
  let wrong = 0;
  for (const b of blocks) {
    const at = b.block * bs + (rand(4).readUInt32LE(0) % 64) * 512 * 1024;
    const got = Buffer.alloc(512 * 1024);
    await img.read(got, at);
    if (!got.equals(Buffer.alloc(got.length, b.byte))) wrong++;
    cmds.push('-c', `read -P 0x${b.byte.toString(16)} ${b.block * bs} ${bs}`);
  }
  for (let i = 0; i < 8; i++) {
    let block = 0;
    do block = rand(4).readUInt32LE(0) % 65536;
    while (blocks.some((b) => b.block === block));
    const at = block * bs + (rand(4).readUInt32LE(0) % 32) * MiB;
    const got = Buffer.alloc(MiB, 1);
    await img.read(got, at);
    if (!got.equals(Buffer.alloc(MiB))) wrong++;
    cmds.push('-c', `read -P 0 ${at} ${MiB}`);
  }
  // A read across a written and an unwritten block.
  const across = Buffer.alloc(2 * MiB);
  await img.read(across, 129 * bs - MiB);
  t.ok(across.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x23)) && across.subarray(MiB).equals(Buffer.alloc(MiB)), 'read across blocks');
  t.equal(wrong, 0, 'our reader: written blocks hold their byte, unwritten read zeros');
  t.same(await img.allocated(), [
    { offset: 0, length: bs },
    { offset: 127 * bs, length: 2 * bs },
    { offset: 40000 * bs, length: bs },
    { offset: 65535 * bs, length: bs },
  ]);
  await img.close();
  const r = await runTool('qemu-io', ['-r', '-f', 'vhdx', ...cmds, vhdx]);
  t.equal(r.code, 0, 'qemu-io ran');
  t.notMatch(r.stdout + r.stderr, /Pattern verification failed|error/i, 'qemu-io: every pattern verified');
});

t.test('a fixed VHDX we write', async (t) => {
  const raw = join(dir, 'fx.raw');
  const vhdx = join(dir, 'fx.vhdx');
  const size = 48 * MiB + 512;
  const disk = await makeScatteredRaw(raw, size, { seed: 9, count: 30 });
  const src = await open(raw, 'r');
  const w = await vhdxDriver.create!(await LocalFile.open(vhdx, 'w'), noOpener, { size, finalName: vhdx, subformat: 'fixed', blockSize: 8 * MiB });
  t.equal(w.subformat, 'fixed');
  for (const win of windows(disk.extents, size)) {
    const b = Buffer.alloc(win.length);
    await src.read(b, 0, b.length, win.offset);
    await w.write(b, win.offset);
  }
  await w.close();
  await src.close();
  await acceptedByTools(t, vhdx, raw, size);
  t.equal((await checkFile(vhdx)).layout.allocatedBlocks, 7, 'every block present');
  t.ok((await stat(vhdx)).blocks * 512 < 24 * MiB, 'zeros were not written: the file stays sparse');
  // Random writes, zeros among them, over more blocks than the writer remembers holes for.
  const fx2 = join(dir, 'fx2.vhdx');
  const mirror = join(dir, 'fx2.raw');
  await (await open(mirror, 'w')).close();
  await truncate(mirror, 80 * MiB);
  const w2 = await vhdxDriver.create!(await LocalFile.open(fx2, 'w'), noOpener, { size: 80 * MiB, finalName: fx2, subformat: 'fixed', blockSize: MiB });
  await scribble(w2, mirror, 77, 250, MiB);
  await w2.close();
  ok(t, await qemuCompare(mirror, fx2, 'vhdx'), 'random writes into a new fixed disk: qemu-img compare identical');
  t.same((await checkFile(fx2)).problems, []);
});

t.test('we read VHDX from qemu-img and from the fixture writer exactly', async (t) => {
  const raw = join(dir, 'src.raw');
  const size = 48 * MiB;
  await makeScatteredRaw(raw, size, { seed: 3, count: 60, maxLength: 1024 * 1024 });
  const rawHash = await sha256File(raw);
  const cases: [string, () => Promise<ToolResult>][] = [
    ['qemu dynamic (block_state_zero on)', () => qemuConvert(raw, join(dir, 'q1.vhdx'), 'vhdx')],
    ['qemu dynamic (block_state_zero off, 1 MiB blocks)', () => qemuConvert(raw, join(dir, 'q2.vhdx'), 'vhdx', 'block_state_zero=off,block_size=1M')],
    ['qemu fixed', () => qemuConvert(raw, join(dir, 'q3.vhdx'), 'vhdx', 'subformat=fixed')],
    ['fixture 1 MiB blocks', () => fixture(join(dir, 'q4.vhdx'), raw, '--block-size', '1')],
    ['fixture 2 MiB blocks, ZERO state', () => fixture(join(dir, 'q5.vhdx'), raw, '--block-size', '2', '--zero-state')],
    ['fixture 8 MiB blocks, Required=0', () => fixture(join(dir, 'q6.vhdx'), raw, '--block-size', '8', '--required', '0')],
    ['fixture 4096-byte logical sectors', () => fixture(join(dir, 'q7.vhdx'), raw, '--block-size', '4', '--lss', '4096')],
    ['fixture LogGuid set, empty log', () => fixture(join(dir, 'q8.vhdx'), raw, '--block-size', '32', '--log-guid')],
  ];
  let i = 1;
  for (const [name, make] of cases) {
    const vhdx = join(dir, `q${i++}.vhdx`);
    ok(t, await make(), `made: ${name}`);
    const img = await openImage(vhdx);
    const viaQemu = join(dir, 'via-qemu.raw');
    if (!name.includes('4096')) {
      ok(t, await qemuToRaw(vhdx, 'vhdx', viaQemu), `${name}: qemu converts it`);
      t.equal(await sha256File(viaQemu), rawHash, `${name}: qemu reads the source`);
    }
    await readsLikeRaw(t, img, raw, i);
    t.same((await checkFile(vhdx)).problems, [], `${name}: our check is clean`);
    await img.close();
  }
  // An empty qemu-created disk: all zeros, nothing allocated.
  const empty = join(dir, 'empty.vhdx');
  ok(t, await runTool('qemu-img', ['create', '-f', 'vhdx', empty, '100M']), 'qemu-img create');
  const img = await openImage(empty);
  t.equal(img.size, 100 * MiB);
  t.same(await img.allocated(), []);
  const buf = Buffer.alloc(MiB, 7);
  await img.read(buf, 99 * MiB);
  t.ok(buf.equals(Buffer.alloc(MiB)), 'reads zeros');
  await img.close();
});

t.test('a pending log is replayed in memory: exact content, file untouched', async (t) => {
  const raw = join(dir, 'dl.raw');
  const dirty = join(dir, 'dirty.vhdx');
  await makeScatteredRaw(raw, 64 * MiB, { seed: 11, count: 40, maxLength: 1024 * 1024 });
  // The fixture's last data block is in the BAT only through the log.
  const fh = await open(raw, 'r+');
  await fh.write(prng(12)(MiB), 0, MiB, 63 * MiB);
  await fh.close();
  ok(t, await fixture(dirty, raw, '--block-size', '2', '--dirty-log'), 'fixture made');
  const before = await sha256File(dirty);

  const q = await runTool('qemu-img', ['info', '-f', 'vhdx', dirty]);
  t.not(q.code, 0, 'qemu refuses it read-only');
  t.match(q.stderr, /log that needs to be replayed/);
  const ly = await libyalCompare(dirty, raw);
  t.equal(ly.code, 1, 'libvhdi ignores the log and returns stale data (so replay matters)');

  const img = await openImage(dirty);
  await readsLikeRaw(t, img, raw, 13);
  const report = await checkFile(dirty);
  t.same(report.problems, []);
  t.equal(report.layout.logPending, true);
  await img.close();
  t.equal(await sha256File(dirty), before, 'the file is unchanged after reading');

  // A log that relies on bytes the file no longer has is refused (as qemu does).
  const cut = join(dir, 'dirty-cut.vhdx');
  await runTool('cp', [dirty, cut]);
  await truncate(cut, (await stat(cut)).size - MiB);
  await t.rejects(openImage(cut), CorruptImageError);
  await t.rejects(openImage(cut), /expects the file to be at least/);
});

t.test('the active log sequence: highest complete sequence, torn heads ignored, wrap-around', async (t) => {
  const logGuid = guidFromString('11111111-2222-3333-4444-555555555555');
  const sector = (byte: number) => Buffer.alloc(4096, byte);
  const entry = (seq: bigint, tail: number, byte: number) =>
    serializeLogEntry({
      sequenceNumber: seq,
      tail,
      logGuid,
      flushedFileOffset: 8 * MiB,
      lastFileOffset: 8 * MiB,
      descriptors: [
        { kind: 'data', fileOffset: 3 * MiB, sector: sector(byte) },
        { kind: 'zero', fileOffset: 4 * MiB, length: 8192 },
      ],
    });
  const log = Buffer.alloc(MiB);
  const e5 = entry(5n, 0, 5);
  const e6 = entry(6n, 0, 6);
  t.equal(e5.length, 8192, 'one descriptor sector and one data sector');
  e5.copy(log, 0);
  e6.copy(log, 8192);
  entry(3n, 512 * 1024, 3).copy(log, 512 * 1024); // an older, stale sequence
  let seq = findActiveLogSequence(log, logGuid);
  t.same(seq.map((e) => e.sequenceNumber), [5n, 6n]);
  const d = seq[1].descriptors[0];
  t.ok(d.kind === 'data' && Buffer.from(d.sector).equals(sector(6)), 'data sector rebuilt from leading, payload and trailing bytes');
  t.same(findActiveLogSequence(log, ZERO_GUID), [], 'entries of another LogGuid are not ours');
  log[8192 + 100] ^= 1; // tear the head: entry 6 no longer checksums
  seq = findActiveLogSequence(log, logGuid);
  t.same(seq.map((e) => e.sequenceNumber), [5n]);
  // An entry that wraps around the end of the circular log.
  const wrap = Buffer.alloc(MiB);
  const e9 = entry(9n, MiB - 4096, 9);
  e9.copy(wrap, MiB - 4096, 0, 4096);
  e9.copy(wrap, 0, 4096);
  seq = findActiveLogSequence(wrap, logGuid);
  t.same(seq.map((e) => [e.sequenceNumber, e.offset]), [[9n, MiB - 4096]]);
});

t.test('a crafted log entry changes what we read, and only in memory', async (t) => {
  const mem = new MemoryFile('log.vhdx');
  const w = await vhdxDriver.create!(mem, noOpener, { size: 8 * MiB, finalName: 'log.vhdx', blockSize: MiB });
  await w.write(Buffer.alloc(MiB, 0xaa), 2 * MiB);
  await w.write(Buffer.alloc(MiB, 0xbb), 5 * MiB);
  await w.close();
  const pristine = Buffer.from(mem.contents());
  const report = await vhdxDriver.check(mem, noOpener);
  const batOffset = report.layout.batOffset as number;
  // Log: BAT sector with block 2 removed and block 5 pointing at block 2's data; plus a zero range over block 5's data.
  const batSector = Buffer.from(pristine.subarray(batOffset, batOffset + 4096));
  const off2 = batFileOffset(batSector, 2);
  const off5 = batFileOffset(batSector, 5);
  batSector.copy(batSector, 5 * 8, 2 * 8, 2 * 8 + 8);
  batSector.fill(0, 2 * 8, 2 * 8 + 8);
  const logGuid = guidFromString('AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE');
  const entry = serializeLogEntry({
    sequenceNumber: 77n,
    tail: 0,
    logGuid,
    flushedFileOffset: pristine.length,
    lastFileOffset: pristine.length + MiB,
    descriptors: [
      { kind: 'data', fileOffset: batOffset, sector: batSector },
      { kind: 'zero', fileOffset: off5, length: MiB },
    ],
  });
  const bytes = Buffer.from(pristine);
  entry.copy(bytes, report.layout.logOffset as number);
  // Set LogGuid in both headers (re-checksummed).
  for (const o of HEADER_OFFSETS) {
    bytes.set(logGuid, o + 48);
    bytes.writeUInt32LE(crc32c(bytes.subarray(o, o + HEADER_SIZE), 4), o + 4);
  }
  const file = new MemoryFile('log.vhdx', bytes);
  const img = await vhdxDriver.open(file, noOpener);
  const got = Buffer.alloc(MiB);
  await img.read(got, 2 * MiB);
  t.ok(got.equals(Buffer.alloc(MiB)), 'block 2 is gone after replay');
  await img.read(got, 5 * MiB);
  t.ok(got.equals(Buffer.alloc(MiB, 0xaa)), 'block 5 reads the data the replayed BAT points at');
  t.same(await img.allocated(), [{ offset: 5 * MiB, length: MiB }]);
  t.ok(file.contents().equals(bytes), 'file bytes unchanged');
  t.not(off2, off5);
  const rep = await vhdxDriver.check(file, noOpener);
  t.same(rep.problems, []);
  t.equal(rep.layout.logEntries, 1);

  // Growing it in place writes the replay into the file first, then clears LogGuid.
  const wr = await vhdxDriver.openWritable!(file, noOpener);
  await wr.write(Buffer.alloc(512, 0xcc), 5 * MiB); // in place: block 5 is present after the replay
  await wr.close();
  t.equal(file.contents().length, pristine.length + MiB, 'extended to LastFileOffset');
  const h = parseHeader(file.contents().subarray(HEADER_OFFSETS[0], HEADER_OFFSETS[0] + HEADER_SIZE));
  t.ok(h.ok && h.value.logGuid.every((x) => x === 0), 'LogGuid cleared');
  const again = await vhdxDriver.open(file, noOpener);
  await again.read(got, 5 * MiB);
  t.ok(got.subarray(512).equals(Buffer.alloc(MiB - 512, 0xaa)) && got[0] === 0xcc, 'replayed content persists and the write landed in it');
  t.same((await vhdxDriver.check(file, noOpener)).problems, []);
});

/** Random 512-aligned writes into both a writer and a raw mirror; some all zero, some across blocks. */
async function scribble(w: DiskWriter, mirror: string, seed: number, count: number, blockSize: number): Promise<void> {
  const rand = prng(seed);
  const fh = await open(mirror, 'r+');
  try {
    for (let i = 0; i < count; i++) {
      const r = rand(12);
      const sectors = 1 + (r.readUInt16LE(0) % 700);
      let at = (r.readUInt32LE(4) % (w.size / 512 - sectors)) * 512;
      if (i % 5 === 0) at = Math.max(0, Math.ceil(at / blockSize) * blockSize - 1024); // straddle a block edge
      if (at + sectors * 512 > w.size) at = w.size - sectors * 512;
      const data = r[8] % 7 === 0 ? Buffer.alloc(sectors * 512) : rand(sectors * 512);
      await w.write(data, at);
      await fh.write(data, 0, data.length, at);
      if (i % 17 === 0) await w.flush();
    }
  } finally {
    await fh.close();
  }
}

t.test('grow in place over several sessions', async (t) => {
  const size = 64 * MiB + 3 * 512;
  const vhdx = join(dir, 'grow.vhdx');
  const mirror = join(dir, 'grow.raw');
  await (await open(mirror, 'w')).close();
  await truncate(mirror, size);
  const w0 = await vhdxDriver.create!(await LocalFile.open(vhdx, 'w'), noOpener, { size, finalName: vhdx, blockSize: MiB });
  await scribble(w0, mirror, 100, 150, MiB); // touches more blocks than the writer remembers holes for
  await w0.close();
  let prev = await headersOf(vhdx);
  for (let session = 1; session <= 3; session++) {
    const w = await vhdxDriver.openWritable!(await LocalFile.open(vhdx, 'r+'), noOpener);
    await scribble(w, mirror, 100 + session, 60, MiB);
    // Reads through the writer see pending allocations.
    const a = Buffer.alloc(MiB);
    const b = Buffer.alloc(MiB);
    await w.read(a, 7 * MiB);
    const m = await open(mirror, 'r');
    await m.read(b, 0, MiB, 7 * MiB);
    await m.close();
    t.ok(a.equals(b), `session ${session}: the writer reads its own writes`);
    await w.close();
    const now = await headersOf(vhdx);
    const maxSeq = (hs: VhdxHeader[]) => hs.reduce((n, h) => (h.sequenceNumber > n ? h.sequenceNumber : n), 0n);
    t.equal(maxSeq(now), maxSeq(prev) + 2n, `session ${session}: sequence number advanced twice`);
    t.equal(now[0].sequenceNumber + 1n === now[1].sequenceNumber || now[1].sequenceNumber + 1n === now[0].sequenceNumber, true, 'both slots updated');
    t.ok(Buffer.compare(now[0].dataWriteGuid, now[1].dataWriteGuid) === 0, 'both slots hold the new DataWriteGuid');
    t.not(Buffer.from(now[0].fileWriteGuid).toString('hex'), Buffer.from(prev[0].fileWriteGuid).toString('hex'), 'new FileWriteGuid');
    t.not(Buffer.from(now[0].dataWriteGuid).toString('hex'), Buffer.from(prev[0].dataWriteGuid).toString('hex'), 'new DataWriteGuid');
    prev = now;
    ok(t, await qemuCompare(mirror, vhdx, 'vhdx'), `session ${session}: qemu-img compare identical`);
    ok(t, await qemuCheck(vhdx, 'vhdx'), `session ${session}: qemu-img check clean`);
    t.same((await checkFile(vhdx)).problems, [], `session ${session}: our check clean`);
  }
  ok(t, await libyalCompare(vhdx, mirror), 'libvhdi reads the grown disk');
  // A session without writes changes nothing.
  const before = await sha256File(vhdx);
  const idle = await vhdxDriver.openWritable!(await LocalFile.open(vhdx, 'r+'), noOpener);
  await idle.flush();
  await idle.close();
  t.equal(await sha256File(vhdx), before, 'an idle session leaves the file untouched');
});

t.test('grow in place a qemu-made disk (ZERO-state BAT) and the dirty-log fixture', async (t) => {
  const size = 40 * MiB;
  const raw = join(dir, 'g2.raw');
  await makeScatteredRaw(raw, size, { seed: 21, count: 20 });
  const q = join(dir, 'g2q.vhdx');
  ok(t, await qemuConvert(raw, q, 'vhdx', 'block_size=1M'), 'qemu convert');
  const d = join(dir, 'g2d.vhdx');
  ok(t, await fixture(d, raw, '--block-size', '2', '--dirty-log'), 'dirty fixture');
  for (const [name, vhdx] of [['qemu', q], ['dirty-log', d]]) {
    const mirror = join(dir, `g2-${name}.raw`);
    await runTool('cp', [raw, mirror]);
    const w = await vhdxDriver.openWritable!(await LocalFile.open(vhdx, 'r+'), noOpener);
    await scribble(w, mirror, 200, 50, name === 'qemu' ? MiB : 2 * MiB);
    await w.close();
    ok(t, await qemuCompare(mirror, vhdx, 'vhdx'), `${name}: qemu-img compare identical`);
    ok(t, await qemuCheck(vhdx, 'vhdx'), `${name}: qemu-img check clean`);
    ok(t, await libyalCompare(vhdx, mirror), `${name}: libvhdi identical`);
    t.same((await checkFile(vhdx)).problems, [], `${name}: our check clean`);
  }
});

t.test('flush order: an unflushed allocation is not referenced', async (t) => {
  const mem = new MemoryFile('c.vhdx');
  const w = await vhdxDriver.create!(mem, noOpener, { size: 16 * MiB, finalName: 'c.vhdx', blockSize: MiB });
  await w.write(Buffer.alloc(MiB, 1), 0);
  await w.flush();
  await w.write(Buffer.alloc(4096, 2), 4096); // in place
  await w.write(Buffer.alloc(MiB, 3), 9 * MiB); // new block, BAT entry pending
  const crashed = new MemoryFile('crashed.vhdx', mem.contents());
  const img = await vhdxDriver.open(crashed, noOpener);
  const got = Buffer.alloc(MiB);
  await img.read(got, 9 * MiB);
  t.ok(got.equals(Buffer.alloc(MiB)), 'the pending block reads as before (zeros)');
  await img.read(got, 0);
  t.equal(got[4096], 2, 'in-place data is there at once');
  t.same((await vhdxDriver.check(crashed, noOpener)).problems, [], 'a crash before flush leaves a sound file');
  await w.flush();
  const after = await vhdxDriver.open(new MemoryFile('f.vhdx', mem.contents()), noOpener);
  await after.read(got, 9 * MiB);
  t.ok(got.equals(Buffer.alloc(MiB, 3)), 'after flush the block is reachable');
  await w.close();
});

t.test('zeros never allocate, and the written file stays sparse', async (t) => {
  const mem = new MemoryFile('z.vhdx');
  const w = await vhdxDriver.create!(mem, noOpener, { size: 64 * MiB, finalName: 'z.vhdx', blockSize: 2 * MiB });
  const start = mem.contents().length;
  await w.write(Buffer.alloc(8 * MiB), 0);
  t.equal(mem.contents().length, start, 'all-zero writes allocate nothing');
  const buf = Buffer.alloc(4 * MiB);
  buf.fill(9, 3 * MiB, 3 * MiB + 512);
  await w.write(buf, 16 * MiB);
  t.equal(mem.contents().length, start + 2 * MiB, 'one block for one non-zero sector');
  await w.close();
  t.same(await (await vhdxDriver.open(mem, noOpener)).allocated(), [{ offset: 18 * MiB, length: 2 * MiB }]);
});

t.test('bad input gives typed errors', async (t) => {
  const raw = join(dir, 'bad.raw');
  await makeScatteredRaw(raw, 16 * MiB, { seed: 31, count: 10 });
  const good = join(dir, 'good.vhdx');
  const disk = { extents: [{ offset: 0, length: 16 * MiB }] };
  await exportRaw(raw, good, 16 * MiB, disk.extents, MiB);
  const copy = async (name: string) => {
    const p = join(dir, name);
    await runTool('cp', [good, p]);
    return p;
  };
  const head = await readFileAt(good, 0, 64 * 1024);
  t.equal(vhdxDriver.probe(head, Buffer.alloc(512)), 100);
  t.equal(vhdxDriver.probe(Buffer.from('conectix'), Buffer.alloc(512)), 0);

  // Foreign bytes.
  await t.rejects(openImage(raw), ForeignFormatError);
  await t.rejects(checkFile(raw), ForeignFormatError);
  await t.rejects(vhdxDriver.open(new MemoryFile('empty'), noOpener), ForeignFormatError);

  // Truncated: inside the header section, inside the BAT region, inside the payload.
  for (const [name, len] of [['t1', 200 * 1024], ['t2', 3 * MiB + 4096], ['t3', (await stat(good)).size - MiB / 2]] as const) {
    const p = await copy(`${name}.vhdx`);
    await truncate(p, len);
    if (name === 't3') {
      const img = await openImage(p);
      await t.rejects(img.allocated(), CorruptImageError, 'a block past the end is found when reached');
      await t.rejects(img.read(Buffer.alloc(MiB), 15 * MiB), /truncated/);
      await img.close();
    } else {
      await t.rejects(openImage(p), CorruptImageError, `${name}: refused`);
      await t.rejects(openImage(p), /truncated/);
    }
    const report = await checkFile(p);
    t.ok(report.problems.length > 0, `${name}: our check reports it: ${report.problems[0]}`);
  }

  // One header bad: the other is used, by us and by qemu.
  const [h1, h2] = await headersOf(good);
  const current = h2.sequenceNumber > h1.sequenceNumber ? 1 : 0;
  for (const slot of [0, 1]) {
    const p = await copy(`h${slot}.vhdx`);
    await patchFile(p, HEADER_OFFSETS[slot] + 100, Buffer.from([0xff]));
    const img = await openImage(p);
    await readsLikeRaw(t, img, raw, slot);
    await img.close();
    ok(t, await qemuCompare(raw, p, 'vhdx'), `header ${slot + 1} bad (${slot === current ? 'current' : 'older'}): qemu falls back too`);
    const report = await checkFile(p);
    t.match(report.problems.join(' '), new RegExp(`header ${slot + 1} .* is invalid`));
  }
  const both = await copy('hboth.vhdx');
  await patchFile(both, HEADER_OFFSETS[0] + 100, Buffer.from([0xff]));
  await patchFile(both, HEADER_OFFSETS[1] + 100, Buffer.from([0xff]));
  await t.rejects(openImage(both), CorruptImageError);
  await t.rejects(openImage(both), /no valid VHDX header/);
  t.not((await runTool('qemu-img', ['info', '-f', 'vhdx', both])).code, 0, 'qemu refuses it too');

  // Region tables: one bad copy falls back (and check says so); both bad refuse.
  const rt1 = await copy('rt1.vhdx');
  await patchFile(rt1, REGION_TABLE_OFFSETS[0] + 1000, Buffer.from([1]));
  const img = await openImage(rt1);
  await readsLikeRaw(t, img, raw, 3);
  await img.close();
  t.match((await checkFile(rt1)).problems.join(' '), /region table 1 .* is invalid/);
  const rtb = await copy('rtb.vhdx');
  await patchFile(rtb, REGION_TABLE_OFFSETS[0] + 1000, Buffer.from([1]));
  await patchFile(rtb, REGION_TABLE_OFFSETS[1] + 1000, Buffer.from([1]));
  await t.rejects(openImage(rtb), /no valid VHDX region table/);
  const fx = join(dir, 'fx-rt.vhdx');
  ok(t, await fixture(fx, raw, '--bad-crc', 'rt'), 'fixture with a bad region table');
  await t.rejects(openImage(fx), CorruptImageError);
  // An unknown region marked required.
  const req = await copy('req.vhdx');
  const table = await readFileAt(req, REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE);
  table.writeUInt32LE(3, 8);
  guidFromString('01234567-89AB-CDEF-0123-456789ABCDEF').forEach((b, i) => (table[16 + 64 + i] = b));
  table.writeUInt32LE(8 * MiB, 16 + 64 + 16);
  table.writeUInt32LE(MiB, 16 + 64 + 24);
  table.writeUInt32LE(1, 16 + 64 + 28);
  table.writeUInt32LE(crc32c(table, 4), 4);
  await patchFile(req, REGION_TABLE_OFFSETS[0], table);
  await patchFile(req, REGION_TABLE_OFFSETS[1], table);
  await t.rejects(openImage(req), UnsupportedVersionError);

  // BAT entries our check must catch: two blocks sharing space, one past the end, reserved bits.
  const ov = await copy('ov.vhdx');
  const batAt = (await checkFile(ov)).layout.batOffset as number;
  const entries = await readFileAt(ov, batAt, 16 * 8);
  entries.copy(entries, 8, 0, 8); // block 1 at block 0's offset
  entries.writeUInt32LE(entries.readUInt32LE(2 * 8) + 8, 2 * 8); // reserved bit 3 on block 2
  entries.writeUInt32LE(4095 * MiB + 6, 3 * 8); // block 3 at 4095 MiB, past the end
  await patchFile(ov, batAt, entries);
  const problems = (await checkFile(ov)).problems.join('\n');
  t.match(problems, /two payload blocks overlap/);
  t.match(problems, /BAT entry 2 has reserved bits/);
  t.match(problems, /payload block 3 .* is not inside the file/);
  t.not((await qemuCheck(ov, 'vhdx')).code, 0, 'qemu-img check agrees the BAT is bad');

  // A differencing VHDX is out of scope: refused with what to do.
  const parent = join(dir, 'parent.vhdx');
  ok(t, await fixture(parent, raw, '--block-size', '1'), 'parent');
  const child = join(dir, 'child.vhdx');
  ok(t, await fixture(child, raw, '--block-size', '1', '--parent', parent, '--parent-raw', raw), 'child');
  await t.rejects(openImage(child), UnsupportedVersionError);
  await t.rejects(openImage(child), /differencing VHDX/);

  // Writer arguments.
  const mem = new MemoryFile('w.vhdx');
  await t.rejects(vhdxDriver.create!(mem, noOpener, { size: 1000, finalName: 'w' }), UsageError);
  await t.rejects(vhdxDriver.create!(mem, noOpener, { size: 65 * 1024 * 1024 * MiB, finalName: 'w' }), UsageError);
  await t.rejects(vhdxDriver.create!(mem, noOpener, { size: MiB, finalName: 'w', blockSize: 3 * MiB }), UsageError);
  await t.rejects(vhdxDriver.create!(mem, noOpener, { size: MiB, finalName: 'w', subformat: 'differencing' }), UsageError);
  const w = await vhdxDriver.create!(mem, noOpener, { size: 4 * MiB, finalName: 'w' });
  await t.rejects(w.write(Buffer.alloc(100), 0), UsageError);
  await t.rejects(w.write(Buffer.alloc(512), 4 * MiB), UsageError);
  await w.close();
});

t.test('mutated metadata never crashes the reader untyped or makes it allocate wildly', async (t) => {
  const mem = new MemoryFile('fz.vhdx');
  const w = await vhdxDriver.create!(mem, noOpener, { size: 4 * MiB, finalName: 'fz.vhdx', blockSize: MiB });
  await w.write(prng(50)(MiB), MiB);
  await w.close();
  const base = Buffer.from(mem.contents());
  const rand = prng(51);
  // Areas: headers, region tables, metadata table and items, BAT, and a log entry area.
  const areas = [
    [HEADER_OFFSETS[0], 80],
    [REGION_TABLE_OFFSETS[0], 80],
    [2 * MiB, 32 * 6],
    [2 * MiB + 64 * 1024, 48],
    [3 * MiB, 64],
  ];
  let typed = 0;
  let fine = 0;
  const untyped: string[] = [];
  const crcs = [...HEADER_OFFSETS.map((o) => [o, HEADER_SIZE]), ...REGION_TABLE_OFFSETS.map((o) => [o, REGION_TABLE_SIZE])];
  for (let i = 0; i < 200; i++) {
    const r = rand(16);
    const [start, len] = areas[r[0] % areas.length];
    const touched: [number, number][] = [];
    for (let k = 0; k < 1 + (r[1] % 4); k++) {
      const at = start + (r.readUInt16LE(2 + 2 * k) % len);
      touched.push([at, base[at]]);
      base[at] = r[10 + k];
    }
    // Re-checksum so the mutation reaches the parsers behind the CRCs.
    const savedCrcs = crcs.map(([o]) => base.readUInt32LE(o + 4));
    for (const [o, n] of crcs) base.writeUInt32LE(crc32c(base.subarray(o, o + n), 4), o + 4);
    const file = new MemoryFile('m', base); // a copy
    crcs.forEach(([o], k) => base.writeUInt32LE(savedCrcs[k], o + 4));
    for (const [at, b] of touched.reverse()) base[at] = b;
    try {
      const img = await vhdxDriver.open(file, noOpener);
      await img.allocated();
      await img.read(Buffer.alloc(64 * 1024), Math.max(0, Math.min(img.size - 65536, MiB)));
      await vhdxDriver.check(file, noOpener);
      fine++;
    } catch (e) {
      if (e instanceof ImagekeepError) typed++;
      else untyped.push(String(e));
    }
  }
  t.same(untyped, [], 'every failure is a typed error');
  t.ok(typed > 50 && fine > 50, `both outcomes happen (${typed} refused, ${fine} read)`);
});
