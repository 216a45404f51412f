// Proves MBR (primaries, extended, logicals) and GPT tables made by sfdisk/sgdisk read back with the numbers, offsets, lengths and types sfdisk --json reports, the backup GPT is used when the primary is bad, and lying tables give typed errors or clipping, quickly.
import t from 'tap';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { truncate } from 'node:fs/promises';
import { RawDevice } from '../src/formats/raw.js';
import {
  CorruptPartitionTableError,
  parseGptHeader,
  parseMbr,
  readPartitionTable,
  type PartitionTable,
} from '../src/formats/disk/partitions.js';
import { findFreeRanges } from '../src/formats/fs/allocation.js';
import { MemoryDevice, must, run, tempDir } from './helpers/alloc-tools.js';
import { patchFile, readFileAt } from './helpers/cli.js';

const { dir: work, cleanup } = await tempDir('parts');
t.teardown(cleanup);

interface SfdiskPart {
  node: string;
  start: number;
  size: number;
  type: string;
  name?: string;
  bootable?: boolean;
}

async function sfdiskJson(image: string): Promise<{ label: string; partitions: SfdiskPart[] }> {
  const out = await must('sfdisk', ['--json', image]);
  return (JSON.parse(out) as { partitiontable: { label: string; partitions: SfdiskPart[] } }).partitiontable;
}

async function table(image: string): Promise<PartitionTable> {
  const dev = await RawDevice.openPath(image);
  try {
    return await readPartitionTable(dev);
  } finally {
    await dev.close();
  }
}

/** What sfdisk says, in our shape: number from the node name, bytes, type normalized. */
function expected(image: string, parts: SfdiskPart[], gpt: boolean) {
  return parts.map((p) => ({
    number: Number(p.node.slice(image.length)),
    offset: p.start * 512,
    length: p.size * 512,
    type: gpt ? p.type.toLowerCase() : p.type.toLowerCase().padStart(2, '0'),
  }));
}



/** Rewrites the GPT header at `lba` with `entryCount`, recomputing its CRC32 the way the spec says. */
async function lieAboutEntryCount(image: string, lba: number, entryCount: number): Promise<void> {
  const h = await readFileAt(image, lba * 512, 512);
  const size = h.readUInt32LE(12);
  h.writeUInt32LE(entryCount, 80);
  h.writeUInt32LE(0, 16);
  h.writeUInt32LE(crc32(h.subarray(0, size)), 16);
  await patchFile(image, lba * 512, h);
}

let gptTemplate: string | undefined;

/** A copy of one sgdisk-made disk (sgdisk syncs the whole machine, about a second a run). */
async function makeGpt(name: string): Promise<string> {
  if (!gptTemplate) {
    gptTemplate = join(work, 'gpt-template.img');
    await must('truncate', ['-s', '100M', gptTemplate]);
    // Slots 1, 3, 4 used; slot 2 left empty in the middle.
    await must('sgdisk', ['-n1:2048:+20M', '-t1:0700', '-c1:data one', '-n3:0:+20M', '-t3:8300', '-c3:linux', '-n4:0:+10M', '-t4:ef00', gptTemplate]);
  }
  const image = join(work, name);
  await must('cp', ['--sparse=always', gptTemplate, image]);
  return image;
}

async function makeMbr(name: string): Promise<string> {
  const image = join(work, name);
  await must('truncate', ['-s', '100M', image]);
  await must('sfdisk', ['-q', '--wipe', 'never', image], {
    input: 'label: dos\nstart=2048,size=20M,type=7,bootable\nsize=20M,type=83\ntype=5\nsize=10M,type=83\nsize=10M,type=7\nsize=5M,type=82\n',
  });
  return image;
}

t.test('GPT from sgdisk equals sfdisk --json', async (tt) => {
  const image = await makeGpt('gpt.img');
  const theirs = await sfdiskJson(image);
  tt.equal(theirs.label, 'gpt');
  const ours = await table(image);
  tt.equal(ours.scheme, 'gpt');
  tt.equal(ours.sectorSize, 512);
  tt.same(ours.partitions.map(({ number, offset, length, type }) => ({ number, offset, length, type })), expected(image, theirs.partitions, true));
  tt.same(ours.partitions.map((p) => p.number), [1, 3, 4], 'slot 2 empty, numbers not reused');
  tt.same(ours.partitions.map((p) => p.name), ['data one', 'linux', undefined], 'names as sfdisk reports them');
  tt.same(theirs.partitions.map((p) => p.name), ['data one', 'linux', undefined]);
  tt.same(ours.notes, []);
});

t.test('MBR with extended and logicals from sfdisk equals sfdisk --json', async (tt) => {
  const image = await makeMbr('mbr.img');
  const theirs = await sfdiskJson(image);
  tt.equal(theirs.label, 'dos');
  const ours = await table(image);
  tt.equal(ours.scheme, 'mbr');
  tt.same(ours.partitions.map(({ number, offset, length, type }) => ({ number, offset, length, type })), expected(image, theirs.partitions, false));
  tt.same(ours.partitions.map((p) => p.number), [1, 2, 3, 5, 6, 7]);
  tt.same(ours.partitions.map((p) => p.bootable), theirs.partitions.map((p) => p.bootable === true), 'boot flags');
  tt.equal(ours.structures.filter((s) => s.what.startsWith('EBR')).length, 3, 'three EBRs recorded as table structures');
});

t.test('a bad primary GPT falls back to the backup, as sfdisk does', async (tt) => {
  const image = await makeGpt('gpt-backup.img');
  const good = await table(image);
  await patchFile(image, 512 + 40, Buffer.from([0xde, 0xad])); // inside the header: CRC no longer matches
  const ours = await table(image);
  tt.same(ours.partitions, good.partitions, 'same partitions from the backup');
  tt.match(ours.notes.join(' '), /primary GPT unusable \(GPT header at LBA 1: header CRC32 is 0x[0-9a-f]+, the bytes give 0x[0-9a-f]+\); used the backup at LBA 204799/);
  const theirs = await sfdiskJson(image);
  tt.same(ours.partitions.map(({ number, offset, length, type }) => ({ number, offset, length, type })), expected(image, theirs.partitions, true), 'sfdisk agrees');
});

t.test('a GPT that lies about its entry count', async (tt) => {
  const image = await makeGpt('gpt-lie.img');
  const good = await table(image);
  const lastLba = 100 * 2048 - 1;
  await lieAboutEntryCount(image, 1, 0xffffffff);
  let started = Date.now();
  const one = await table(image);
  tt.ok(Date.now() - started < 1000, 'answered quickly');
  tt.same(one.partitions, good.partitions, 'primary refused, backup used');
  tt.match(one.notes.join(' '), /4294967295 entries of 128 bytes make \d+ bytes, more than the 4194304 we accept/);

  await lieAboutEntryCount(image, lastLba, 0xffffffff);
  started = Date.now();
  const err = await table(image).then(
    () => undefined,
    (e: unknown) => e,
  );
  tt.ok(Date.now() - started < 1000, 'answered quickly');
  tt.type(err, CorruptPartitionTableError, 'both copies lie: typed error');
  tt.match((err as CorruptPartitionTableError).message, /protective MBR found but no usable GPT header/);
  tt.equal((err as CorruptPartitionTableError).code, 'CORRUPT_PARTITION_TABLE');

  const dev = await RawDevice.openPath(image);
  const report = await findFreeRanges(dev);
  await dev.close();
  tt.equal(report.scheme, 'gpt');
  tt.same(report.free, []);
  tt.match(report.volumes, [{ offset: 0, fs: 'unknown', freeBytes: 0, note: /partition table unreadable/ }]);

  // A count that fits our cap but not the CRC'd array: also refused.
  const image2 = await makeGpt('gpt-lie2.img');
  await lieAboutEntryCount(image2, 1, 4096);
  tt.same((await table(image2)).partitions, good.partitions, 'entry array CRC mismatch: backup used');
});

t.test('an extended chain that loops', async (tt) => {
  const image = await makeMbr('loop.img');
  const ours = await table(image);
  const ext = ours.partitions.find((p) => p.number === 3);
  const ebrs = ours.structures.filter((s) => s.what.startsWith('EBR')).map((s) => s.offset);
  tt.ok(ext && ebrs.length === 3);
  // The last EBR gets a link (slot 2) back to the first EBR: start 0 relative to the extended partition.
  const link = Buffer.alloc(16);
  link[4] = 0x05;
  link.writeUInt32LE(0, 8);
  link.writeUInt32LE(2048, 12);
  await patchFile(image, ebrs[2] + 446 + 16, link);
  const started = Date.now();
  await tt.rejects(table(image), { name: 'CorruptPartitionTableError', message: /EBR chain loops back to sector 83968 after 3 links/ });
  tt.ok(Date.now() - started < 1000, 'answered quickly');

  // A first EBR that links to itself.
  const self = await makeMbr('selfloop.img');
  const first = (await table(self)).structures.find((s) => s.what.startsWith('EBR'));
  await patchFile(self, (first?.offset ?? 0) + 446 + 16, link);
  await tt.rejects(table(self), CorruptPartitionTableError);

  const dev = await RawDevice.openPath(image);
  const report = await findFreeRanges(dev);
  await dev.close();
  tt.equal(report.scheme, 'mbr');
  tt.same(report.free, []);
  tt.match(report.volumes[0].note, /partition table unreadable: extended partition 3: the EBR chain loops/);
});

t.test('an EBR without its signature ends the chain', async (tt) => {
  const image = await makeMbr('ebr-nosig.img');
  const ebrs = (await table(image)).structures.filter((s) => s.what.startsWith('EBR')).map((s) => s.offset);
  await patchFile(image, ebrs[1] + 510, Buffer.from([0, 0]));
  const ours = await table(image);
  tt.same(ours.partitions.map((p) => p.number), [1, 2, 3, 5]);
  tt.match(ours.notes.join(' '), /no 0x55AA signature in the EBR at sector 106496; chain ends there/);
});

t.test('garbage in slot 4 of an EBR is ignored, as by Linux and sfdisk', async (tt) => {
  const image = await makeMbr('ebr-garbage.img');
  const before = await sfdiskJson(image);
  const ebrs = (await table(image)).structures.filter((s) => s.what.startsWith('EBR')).map((s) => s.offset);
  const junk = Buffer.from([0x00, 1, 2, 3, 0x83, 4, 5, 6, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x20, 0x00]); // 2 Mi sectors at +1 Mi
  await patchFile(image, ebrs[0] + 446 + 48, junk);
  const ours = await table(image);
  tt.same(ours.partitions.map((p) => p.number), [1, 2, 3, 5, 6, 7], 'numbering unchanged');
  tt.same(
    ours.partitions.map(({ number, offset, length, type }) => ({ number, offset, length, type })),
    expected(image, (await sfdiskJson(image)).partitions, false),
    'sfdisk agrees',
  );
  tt.same((await sfdiskJson(image)).partitions.length, before.partitions.length);
  tt.match(ours.notes.join(' '), /slot 4 does not fit the extended partition; ignored/);
});

t.test('partitions past the device end are clipped or left out', async (tt) => {
  const image = await makeMbr('short.img');
  const full = await table(image);
  await truncate(image, 60 * 1024 * 1024); // 60 MiB: p5 whole, p6 cut, p7 and its EBR gone
  const ours = await table(image);
  const byNumber = new Map(ours.partitions.map((p) => [p.number, p]));
  tt.same(byNumber.get(5), full.partitions.find((p) => p.number === 5), 'p5 intact');
  const p6 = byNumber.get(6);
  tt.equal(p6?.offset, 55574528);
  tt.equal(p6?.length, 60 * 1024 * 1024 - 55574528, 'p6 clipped at the device end');
  tt.notOk(byNumber.has(7), 'p7 left out');
  tt.equal(byNumber.get(3)?.length, 60 * 1024 * 1024 - 42991616, 'extended clipped');
  tt.match(ours.notes.join(' '), /logical partition 6 .* passes the device end/);
  tt.match(ours.notes.join(' '), /EBR at sector 129024 is past the device end/);

  const gpt = await makeGpt('short-gpt.img');
  await truncate(gpt, 30 * 1024 * 1024); // backup GPT gone, p3 cut, p4 gone
  const g = await table(gpt);
  tt.same(g.partitions.map((p) => [p.number, p.length]), [[1, 20 * 1024 * 1024], [3, 30 * 1024 * 1024 - 22020096]]);
  tt.match(g.notes.join(' '), /GPT partition 4 starts at sector 83968, past the device end/);
});

t.test('pure parsers: what is and is not a partition table', async (tt) => {
  const s = new Uint8Array(512);
  tt.match(parseMbr(s), { kind: 'none', reason: /no 0x55AA/ });
  s[510] = 0x55;
  s[511] = 0xaa;
  tt.match(parseMbr(s), { kind: 'mbr', entries: [] }, 'signature and empty slots: an empty MBR');
  s.set(Buffer.from('NTFS    '), 3);
  tt.match(parseMbr(s), { kind: 'none', reason: /NTFS boot sector/ });
  s.fill(0, 3, 11);
  s[446 + 16] = 0x12;
  tt.match(parseMbr(s), { kind: 'none', reason: /slot 2 has status 0x12/ });
  s[446 + 16] = 0;
  s[446 + 4] = 0xee;
  s[446 + 12] = 1;
  tt.same(parseMbr(s), { kind: 'protective' });
  tt.throws(() => parseMbr(new Uint8Array(100)), CorruptPartitionTableError, 'short sector');
  // A protective MBR on a device too small for any GPT header: a typed error, not a read past the end.
  await tt.rejects(readPartitionTable(new MemoryDevice(Uint8Array.from(s))), { name: 'CorruptPartitionTableError', message: /no room for one/ });
  const two = new Uint8Array(1024);
  two.set(s);
  await tt.rejects(readPartitionTable(new MemoryDevice(two)), { name: 'CorruptPartitionTableError', message: /expected signature "EFI PART"/ });
  tt.same(await readPartitionTable(new MemoryDevice(new Uint8Array(100))), { scheme: 'none', sectorSize: 512, partitions: [], structures: [], notes: [] }, 'device shorter than a sector');

  tt.throws(() => parseGptHeader(new Uint8Array(512), 1), { message: /expected signature "EFI PART", found/ });
  const image = await makeGpt('parse.img');
  const header = await readFileAt(image, 512, 512);
  tt.match(parseGptHeader(header, 1), { myLba: 1, alternateLba: 204799, firstUsableLba: 34, entriesLba: 2, entryCount: 128, entrySize: 128 });
  tt.throws(() => parseGptHeader(header, 204799), { message: /it says it is at LBA 1/ }, 'a header read at the wrong place');
  const sgdisk = await run('sgdisk', ['-v', image]);
  tt.match(sgdisk.stdout, /No problems found/, 'sgdisk agrees the fixture is sound');
});
