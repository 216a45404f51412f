/**
 * Our own structure check of a VMDK: what qemu-img check and libvmdk do not look at, or
 * look at only when it is too late. The descriptor's first line and extent names (libvmdk
 * needs them exact), the redundant grain directory and tables agreeing with the primary
 * ones, grains inside the file and not overlapping each other or the tables, grain markers
 * naming their own LBA, the streamOptimized footer, and a flat extent exactly as long as
 * the descriptor says (qemu-img check passes a short one). Never throws on bad input: every
 * finding is one sentence in `problems`.
 */
import { SECTOR } from '../bytes.js';
import type { FileOpener, StructureReport } from '../disk-image.js';
import { ImagekeepError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  DESCRIPTOR_SIGNATURE,
  GRAIN_MARKER_SIZE,
  MAX_DESCRIPTOR_BYTES,
  SUBFORMATS,
  baseName,
  headerProblems,
  isZero,
  parseDescriptor,
  parseMarker,
  parseSparseHeader,
  parseTable,
  tableSectors,
  tableView,
  type Descriptor,
  type VmdkSubformat,
} from './codec.js';
import { sniff } from './image.js';
import { SparseExtent } from './sparse-extent.js';

type Layout = StructureReport['layout'];

/** Problems of one kind beyond this many are counted, not listed. */
const LIST_LIMIT = 5;
/** Grain tables compared per round (8 MiB of tables and as much of redundant ones). */
const CHUNK_TABLES = 4096;
const PACK = 2 ** 20;

function message(e: unknown): string {
  if (e instanceof ImagekeepError || e instanceof RangeError) return e.message;
  return e instanceof Error ? e.message : String(e);
}

export async function checkVmdk(file: RandomAccessFile, opener: FileOpener): Promise<StructureReport> {
  const problems: string[] = [];
  const layout: Layout = { format: 'vmdk' };
  try {
    const size = await file.size();
    const head = new Uint8Array(Math.min(size, 4096));
    await file.read(head, 0);
    const kind = sniff(head);
    if (kind === 'sparse') await checkEmbedded(file, problems, layout);
    else if (kind === 'descriptor') await checkDescriptorFile(file, opener, size, problems, layout);
    else problems.push(`${file.path}: neither a "KDMV" sparse header nor a "# Disk DescriptorFile" descriptor at the start; not a VMDK we read`);
  } catch (e) {
    problems.push(message(e));
  }
  return { problems, layout };
}

function checkDescriptorText(d: Descriptor, where: string, problems: string[]): void {
  if (d.firstLine !== DESCRIPTOR_SIGNATURE) {
    problems.push(`${where}: the descriptor's first line is "${d.firstLine.slice(0, 60)}", not "${DESCRIPTOR_SIGNATURE}"; libvmdk refuses such a descriptor`);
  }
  if (!SUBFORMATS.includes(d.createType as VmdkSubformat) && !['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'].includes(d.createType)) {
    problems.push(`${where}: createType "${d.createType}" is not one we write (${SUBFORMATS.join(', ')})`);
  }
  // qemu writes the CID without leading zeros, so 1 to 8 digits
  if (!/^[0-9a-fA-F]{1,8}$/.test(d.cid)) problems.push(`${where}: CID "${d.cid}" is not a 32-bit hex number`);
}

async function checkEmbedded(file: RandomAccessFile, problems: string[], layout: Layout): Promise<void> {
  const fileSize = await file.size();
  const headBytes = new Uint8Array(Math.min(fileSize, 512));
  await file.read(headBytes, 0);
  const h0 = parseSparseHeader(headBytes, file.path);
  // the GD_AT_END footer is read (and its absence reported) by SparseExtent.open below
  if (!h0.gdAtEnd) {
    const hp = headerProblems(h0, fileSize);
    if (hp.length > 0) {
      for (const p of hp) problems.push(`${file.path}: ${p}`);
      return;
    }
  }
  const extent = await SparseExtent.open(file, file.path);
  const h = extent.header;
  if (h0.gdAtEnd) {
    for (const p of headerProblems(h, fileSize)) problems.push(`${file.path} (footer): ${p}`);
    for (const k of ['version', 'flags', 'capacity', 'grainSize', 'numGTEsPerGT', 'overHead', 'compressAlgorithm', 'descriptorOffset', 'descriptorSize'] as const) {
      if (h0[k] !== h[k]) problems.push(`${file.path}: the footer's ${k} (${h[k]}) differs from the header's (${h0[k]})`);
    }
  }
  let createType = extent.compressed ? 'streamOptimized' : 'monolithicSparse';
  if (extent.descriptorText === null) {
    problems.push(`${file.path}: no embedded descriptor; VMware and libvmdk need one in a monolithic sparse file`);
  } else {
    try {
      const d = parseDescriptor(extent.descriptorText, `${file.path} (embedded descriptor)`);
      checkDescriptorText(d, file.path, problems);
      createType = d.createType;
      if (extent.compressed !== (d.createType === 'streamOptimized')) {
        problems.push(`${file.path}: the descriptor says createType "${d.createType}" but the grains are ${extent.compressed ? '' : 'not '}compressed`);
      }
      const own = baseName(file.path);
      if (d.extents.length !== 1) problems.push(`${file.path}: the embedded descriptor lists ${d.extents.length} extents; a monolithic file has exactly one`);
      const e = d.extents[0];
      if (e) {
        if (e.type !== 'SPARSE') problems.push(`${file.path}: the embedded descriptor's extent is ${e.type}, not SPARSE`);
        if (e.fileName !== own) {
          problems.push(`${file.path}: the embedded descriptor names the extent "${e.fileName ?? ''}", not this file's name "${own}"; libvmdk opens the extent by that name, so rename the file back or rewrite the descriptor`);
        }
        if (e.sectors !== h.capacity) problems.push(`${file.path}: the descriptor gives ${e.sectors} sectors but the header's capacity is ${h.capacity}`);
      }
    } catch (e) {
      problems.push(message(e));
    }
  }
  layout.createType = createType;
  layout.version = h.version;
  layout.flags = `0x${h.flags.toString(16)}`;
  layout.virtualSize = extent.sizeBytes;
  layout.capacitySectors = h.capacity;
  layout.grainSize = extent.grainBytes;
  layout.numGTEsPerGT = h.numGTEsPerGT;
  layout.gdOffset = h.gdOffset;
  layout.rgdOffset = extent.rgd ? h.rgdOffset : 0;
  layout.gdAtEnd = h0.gdAtEnd;
  layout.gtCount = extent.gd.length;
  layout.overHead = h.overHead;
  layout.compressed = extent.compressed;
  layout.markers = extent.markers;
  layout.descriptorSectors = h0.descriptorSize;
  layout.fileSize = fileSize;
  await checkSparseTables(extent, problems, layout);
}

/** Reads the tables whose sectors `dir` gives for `indices`, adjacent ones in one read; a table past the end is a problem, not an error. */
async function readTables(
  extent: SparseExtent,
  dir: Uint32Array,
  indices: number[],
  what: string,
  problems: string[],
): Promise<Map<number, Uint32Array>> {
  const n = extent.header.numGTEsPerGT;
  const gtSectors = tableSectors(n);
  const out = new Map<number, Uint32Array>();
  const sorted = indices.filter((i) => !extent.isEmptyEntry(dir[i]!)).sort((a, b) => dir[a]! - dir[b]!);
  for (let k = 0; k < sorted.length; ) {
    let end = k + 1;
    while (end < sorted.length && dir[sorted[end]!]! === dir[sorted[end - 1]!]! + gtSectors) end++;
    const first = dir[sorted[k]!]!;
    if ((first + (end - k - 1) * gtSectors) * SECTOR + n * 4 <= extent.fileSize) {
      const bytes = new Uint8Array((end - k - 1) * gtSectors * SECTOR + n * 4);
      await extent.file.read(bytes, first * SECTOR);
      for (let m = k; m < end; m++) out.set(sorted[m]!, tableView(bytes.subarray((m - k) * gtSectors * SECTOR), n));
    } else {
      for (let m = k; m < end; m++) {
        const s = dir[sorted[m]!]!;
        if (s * SECTOR + n * 4 > extent.fileSize) problems.push(`${extent.name}: ${what} ${sorted[m]} at sector ${s} passes the end of the file (${extent.fileSize} bytes)`);
        else {
          const bytes = new Uint8Array(n * 4);
          await extent.file.read(bytes, s * SECTOR);
          out.set(sorted[m]!, parseTable(bytes, n));
        }
      }
    }
    k = end;
  }
  return out;
}

/**
 * GD against RGD, GT against redundant GT, grains inside the file and not overlapping each
 * other or the metadata. Ranges are packed as start × 2^20 + length in sectors (starts are
 * u32, lengths under 2^20), so a native sort of plain numbers orders them.
 */
async function checkSparseTables(extent: SparseExtent, problems: string[], layout: Layout): Promise<void> {
  const h = extent.header;
  const n = h.numGTEsPerGT;
  const gtSectors = tableSectors(n);
  const gdSectors = tableSectors(extent.gd.length);
  const grainsInDisk = Math.ceil(h.capacity / h.grainSize);
  const ranges: number[] = [];
  const pack = (start: number, len: number) => ranges.push(start * PACK + Math.min(len, PACK - 1));
  // only the few big structures are named up front; tables are named when a message needs it
  const named = new Map<number, string>();
  const meta = (start: number, len: number, what?: string) => {
    pack(start, len);
    if (what) named.set(start, what);
  };
  const nameOf = (sector: number): string => {
    const known = named.get(sector);
    if (known) return known;
    const i = extent.gd.indexOf(sector);
    if (i >= 0) return `grain table ${i}`;
    const r = extent.rgd ? extent.rgd.indexOf(sector) : -1;
    return r >= 0 ? `redundant grain table ${r}` : `the grain at sector ${sector}`;
  };
  meta(0, 1, 'the header');
  if (extent.fileHeader.descriptorOffset) meta(extent.fileHeader.descriptorOffset, extent.fileHeader.descriptorSize, 'the descriptor');
  meta(h.gdOffset, gdSectors, 'the grain directory');
  if (extent.rgd) meta(h.rgdOffset, gdSectors, 'the redundant grain directory');
  if (extent.fileHeader.gdAtEnd) {
    const fileSectors = Math.floor(extent.fileSize / SECTOR);
    meta(fileSectors - 3, 3, 'the footer');
  }

  const counts = { rgdMismatch: 0, gtMismatch: 0, outside: 0, lba: 0, beyondDisk: 0, belowOverhead: 0 };
  const note = (key: keyof typeof counts, text: string) => {
    if (counts[key]++ < LIST_LIMIT) problems.push(`${extent.name}: ${text}`);
  };
  let allocated = 0;
  let zeroed = 0;
  const grainSectors = h.grainSize;
  const firstAt = new Uint8Array(GRAIN_MARKER_SIZE);

  for (let c = 0; c < extent.gd.length; c += CHUNK_TABLES) {
    const indices: number[] = [];
    for (let i = c; i < Math.min(extent.gd.length, c + CHUNK_TABLES); i++) indices.push(i);
    if (extent.rgd) {
      for (const i of indices) {
        if (extent.isEmptyEntry(extent.gd[i]!) !== extent.isEmptyEntry(extent.rgd[i]!)) {
          note('rgdMismatch', `grain directory entry ${i} is ${extent.gd[i]} but the redundant one is ${extent.rgd[i]}`);
        }
      }
    }
    const gts = await readTables(extent, extent.gd, indices, 'grain table', problems);
    const rgts = extent.rgd ? await readTables(extent, extent.rgd, indices, 'redundant grain table', problems) : null;
    for (const i of indices) {
      const t = gts.get(i);
      if (!t) continue;
      meta(extent.gd[i]!, gtSectors);
      const rt = rgts?.get(i);
      if (rt) {
        meta(extent.rgd![i]!, gtSectors);
        const same = Buffer.compare(new Uint8Array(t.buffer, t.byteOffset, t.byteLength), new Uint8Array(rt.buffer, rt.byteOffset, rt.byteLength)) === 0;
        for (let j = 0; j < n && !same; j++) {
          if (t[j] !== rt[j]) note('gtMismatch', `grain ${i * n + j}: the grain table says sector ${t[j]} but the redundant grain table says ${rt[j]}`);
        }
      }
      if (isZero(new Uint8Array(t.buffer, t.byteOffset, t.byteLength))) continue;
      for (let j = 0; j < n; j++) {
        const s = t[j]!;
        if (s === 0) continue;
        const grain = i * n + j;
        if (extent.isEmptyEntry(s)) {
          zeroed++;
          continue;
        }
        allocated++;
        if (grain >= grainsInDisk) note('beyondDisk', `grain table ${i} has an entry for grain ${grain}, past the disk's ${grainsInDisk} grains`);
        if (!extent.compressed) {
          if ((s + grainSectors) * SECTOR > extent.fileSize) {
            note('outside', `grain ${grain} at sector ${s} passes the end of the file (${extent.fileSize} bytes)`);
          } else if (s < h.overHead) {
            note('belowOverhead', `grain ${grain} at sector ${s} lies in the metadata area (grains start at sector ${h.overHead})`);
          }
          pack(s, grainSectors);
          continue;
        }
        if (s * SECTOR + GRAIN_MARKER_SIZE > extent.fileSize) {
          note('outside', `grain ${grain} at sector ${s} passes the end of the file (${extent.fileSize} bytes)`);
          continue;
        }
        let len = grainSectors;
        if (extent.markers) {
          await extent.file.read(firstAt, s * SECTOR);
          const m = parseMarker(firstAt);
          len = Math.ceil((GRAIN_MARKER_SIZE + m.size) / SECTOR);
          if (m.value !== grain * grainSectors) note('lba', `grain ${grain} at sector ${s} has a marker naming sector ${m.value} of the disk, not ${grain * grainSectors}`);
          if (m.size === 0 || s * SECTOR + GRAIN_MARKER_SIZE + m.size > extent.fileSize) {
            note('outside', `grain ${grain} at sector ${s} claims ${m.size} compressed bytes, passing the end of the file (${extent.fileSize} bytes)`);
          }
        }
        pack(s, len);
      }
    }
  }
  for (const [key, count] of Object.entries(counts)) {
    if (count > LIST_LIMIT) problems.push(`${extent.name}: ${count - LIST_LIMIT} more problems like the ones above (${key})`);
  }

  const sorted = Float64Array.from(ranges).sort();
  let overlaps = 0;
  for (let k = 1; k < sorted.length; k++) {
    const prevStart = Math.floor(sorted[k - 1]! / PACK);
    const prevEnd = prevStart + (sorted[k - 1]! - prevStart * PACK);
    const start = Math.floor(sorted[k]! / PACK);
    if (start < prevEnd && overlaps++ < LIST_LIMIT) {
      const a = nameOf(prevStart);
      const b = nameOf(start);
      problems.push(`${extent.name}: ${b} overlaps ${a} (sectors ${prevStart}..${prevEnd - 1})`);
    }
  }
  if (overlaps > LIST_LIMIT) problems.push(`${extent.name}: ${overlaps - LIST_LIMIT} more overlaps`);
  layout.allocatedGrains = allocated;
  if (zeroed > 0) layout.zeroedGrains = zeroed;
}

async function checkDescriptorFile(file: RandomAccessFile, opener: FileOpener, size: number, problems: string[], layout: Layout): Promise<void> {
  if (size > MAX_DESCRIPTOR_BYTES) {
    problems.push(`${file.path}: a descriptor of ${size} bytes, more than 1 MiB; not a VMDK descriptor`);
    return;
  }
  const bytes = new Uint8Array(size);
  await file.read(bytes, 0);
  const d = parseDescriptor(Buffer.from(bytes).toString('utf8'), file.path);
  checkDescriptorText(d, file.path, problems);
  layout.createType = d.createType;
  layout.extents = d.extents.length;
  let total = 0;
  for (const e of d.extents) {
    const where = `${file.path}: extent "${e.fileName ?? ''}"`;
    total += e.sectors * SECTOR;
    if (e.type === 'ZERO') continue;
    if (e.type === 'FLAT' && !e.startSectorGiven) problems.push(`${where}: a FLAT line without its start sector; qemu refuses it`);
    if (e.type === 'VMFS' && e.startSectorGiven) problems.push(`${where}: a VMFS line with a start sector; qemu refuses it`);
    if (!['FLAT', 'VMFS', 'SPARSE'].includes(e.type)) {
      problems.push(`${where}: extent type ${e.type} is not one we read`);
      continue;
    }
    let f: RandomAccessFile;
    try {
      f = await opener(e.fileName ?? '', 'r');
    } catch (err) {
      problems.push(`${where}: cannot be opened (${message(err)})`);
      continue;
    }
    try {
      if (e.type === 'SPARSE') {
        const sub: Layout = {};
        const extent = await SparseExtent.open(f, e.fileName ?? f.path);
        if (extent.header.capacity !== e.sectors) problems.push(`${where}: the descriptor gives ${e.sectors} sectors but the extent's header says ${extent.header.capacity}`);
        await checkSparseTables(extent, problems, sub);
        layout.allocatedGrains = Number(layout.allocatedGrains ?? 0) + Number(sub.allocatedGrains ?? 0);
        layout.grainSize = extent.grainBytes;
      } else {
        const flatSize = await f.size();
        const need = (e.startSector + e.sectors) * SECTOR;
        layout.flatSize = Number(layout.flatSize ?? 0) + flatSize;
        if (flatSize < need) {
          problems.push(`${where} is ${flatSize} bytes, shorter than the ${need} the descriptor needs (${e.sectors} sectors from sector ${e.startSector}); libvmdk refuses it and qemu reads past its end as zeros`);
        } else if (flatSize > need && e.startSector === 0) {
          problems.push(`${where} is ${flatSize} bytes, longer than the descriptor's ${e.sectors} sectors (${need} bytes)`);
        }
      }
    } catch (err) {
      problems.push(message(err));
    } finally {
      await f.close().catch(() => {});
    }
  }
  layout.virtualSize = total;
}
