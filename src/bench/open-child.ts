/**
 * Fresh process of the open benchmark, so its peak RSS is node itself plus the open and
 * the reads. Prints one JSON object on stdout.
 *
 *   node open-child.js read IMAGE SAMPLES.json   openPoint + the sampled reads, checked
 *   node open-child.js phases IMAGE              where opening spends time and memory
 */
import { readFile } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { groupChains, listFolder, loadChain } from '../chain/folder.js';
import { ImageFile, KeyRing } from '../chain/image/reader.js';
import { blockCountOf } from '../chain/image/layout.js';
import { chainKey, parseImageName } from '../chain/names.js';
import { openPoint } from '../chain/open.js';
import { dependencyPath } from '../chain/path.js';
import { PointInTime } from '../chain/point.js';
import { peakRssKiB, secs } from './common.js';
import { patternBlock } from './datagen.js';

export interface Samples {
  blockSize: number;
  /** [block, image number of its newest writer or -1 for never written] */
  samples: [number, number][];
}

export interface ReadReport {
  baselineKiB: number;
  layers: number;
  openSeconds: number;
  readSeconds: number;
  reads: number;
  dataReads: number;
  mismatches: number;
  firstMismatch: string | null;
  peakKiB: number;
  maxRssKiB: number;
}

export interface Phase {
  name: string;
  seconds: number;
  /** resident set after the phase */
  rssKiB: number;
}

export interface PhasesReport {
  baselineKiB: number;
  phases: Phase[];
  peakKiB: number;
}

function rssKiB(): number {
  return Math.round(process.memoryUsage().rss / 1024);
}

async function readMode(image: string, samplesPath: string): Promise<ReadReport> {
  const { blockSize, samples } = JSON.parse(await readFile(samplesPath, 'utf8')) as Samples;
  const baselineKiB = rssKiB();
  let t0 = performance.now();
  const { point } = await openPoint(image, new KeyRing(null));
  const openSeconds = secs(t0);
  const got = Buffer.alloc(blockSize);
  const want = Buffer.alloc(blockSize);
  let mismatches = 0;
  let dataReads = 0;
  let firstMismatch: string | null = null;
  t0 = performance.now();
  for (const [b, k] of samples) {
    const length = Math.min(blockSize, point.size - b * blockSize);
    const into = got.subarray(0, length);
    await point.read(into, b * blockSize);
    if (k < 0) want.fill(0);
    else {
      patternBlock(k, b, want);
      dataReads++;
    }
    if (!into.equals(want.subarray(0, length))) {
      mismatches++;
      firstMismatch ??= `block ${b}: expected ${k < 0 ? 'zeros' : `image ${k}'s pattern`}, got bytes starting ${into.subarray(0, 16).toString('hex')}`;
    }
  }
  const readSeconds = secs(t0);
  const report: ReadReport = {
    baselineKiB, layers: point.layers.length, openSeconds, readSeconds, reads: samples.length, dataReads, mismatches, firstMismatch,
    peakKiB: await peakRssKiB(), maxRssKiB: process.resourceUsage().maxRSS,
  };
  await point.close();
  return report;
}

/** The steps of openPoint (resolvePath, then PointInTime.open) timed one by one. */
async function phasesMode(image: string): Promise<PhasesReport> {
  const baselineKiB = rssKiB();
  const phases: Phase[] = [];
  let t0 = performance.now();
  const mark = (name: string) => {
    phases.push({ name, seconds: secs(t0), rssKiB: rssKiB() });
    t0 = performance.now();
  };
  const parsed = parseImageName(basename(image))!;
  const { images } = await listFolder(dirname(image));
  mark(`listFolder (${images.length} images)`);
  const mine = groupChains(images).get(chainKey(parsed.volume, parsed.base)) ?? [];
  const { files } = await loadChain(mine);
  mark(`loadChain (${files.length} headers)`);
  const target = files.find((f) => f.name === basename(image))!;
  const path = dependencyPath(target, files);
  mark(`dependencyPath (${path.length} files)`);
  const layers: ImageFile[] = [];
  for (const f of path) layers.push(await ImageFile.open(f.path, new KeyRing(null)));
  const entries = layers.reduce((n, l) => n + l.index.count, 0);
  mark(`ImageFile.open x${layers.length} (${entries} index entries)`);
  // The dense tables of PointInTime's constructor, rebuilt the same way.
  const top = layers[0]!.header;
  const blockCount = blockCountOf(top.virtualSize, top.blockSize);
  const layerOf = new Uint16Array(blockCount);
  const posOf = new Uint32Array(blockCount);
  for (let l = layers.length - 1; l >= 0; l--) {
    const ix = layers[l]!.index;
    for (let i = 0; i < ix.count; i++) {
      const b = ix.blocks[i]!;
      layerOf[b] = l + 1;
      posOf[b] = i;
    }
  }
  mark(`dense tables (${blockCount} blocks x 6 B = ${Math.round((blockCount * 6) / 2 ** 20)} MiB)`);
  await Promise.all(layers.map((l) => l.close()));
  mark('close');
  // Keep the tables alive until here, so the phase above is measured with them resident.
  if (layerOf.length + posOf.length < 0) console.error('unreachable');
  const point = await PointInTime.open(path.map((f) => f.path), new KeyRing(null));
  mark('then PointInTime.open of the same path, as openPoint does');
  await point.close();
  return { baselineKiB, phases, peakKiB: await peakRssKiB() };
}

async function main(): Promise<void> {
  const [mode, image, samples] = process.argv.slice(2);
  if (mode === 'read' && image && samples) console.log(JSON.stringify(await readMode(image, samples)));
  else if (mode === 'phases' && image) console.log(JSON.stringify(await phasesMode(image)));
  else throw new Error('usage: node open-child.js read IMAGE SAMPLES.json | phases IMAGE');
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? (e.stack ?? e.message) : e);
  process.exit(1);
});
