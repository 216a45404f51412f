/**
 * Which point of the source folder a standby disk should hold next. The job follows the
 * newest chain (highest base number) of its volume; within it, a point qualifies when
 * every file on its dependency path is sound and the lag policy allows it:
 *
 *   newest  the newest sound point;
 *   daily   only points that end a daily (or weekly, monthly, rolling) consolidated file,
 *           or the base;
 *   Nh      the newest point captured at least N hours before now.
 *
 * Sound: not listed in the chain's .bad.log, and verified good by the chain engine (its
 * state store, when its record still describes the file) or, when the engine has not seen
 * the file, by a quick MD5 check now. Reading the blocks later checks each block's digest
 * as well, so a file damaged since its check is still caught.
 */
import { stat } from 'node:fs/promises';
import { ChainBrokenError, UsageError } from '../formats/errors.js';
import { readBadLog } from '../chain/badlog.js';
import { groupChains, listFolder, loadChain, type ChainFile } from '../chain/folder.js';
import { LEVEL_BITS } from '../chain/image/layout.js';
import { badLogPath } from '../chain/names.js';
import { bestEndingAt, dependencyPath } from '../chain/path.js';
import { currentState, loadState } from '../chain/state.js';
import { quickVerify } from '../chain/verify.js';
import type { Lag } from './job.js';
import type { StandbyPoint } from './standby-state.js';

export interface SourceChain {
  volume: string;
  base: number;
  chainId: string;
  files: ChainFile[];
}

export interface SourcePoint extends StandbyPoint {
  /** Dependency path of the point, newest first, ending with the base. */
  path: ChainFile[];
}

/** The newest chain of `volume` (or of the folder's only volume). */
export async function currentChain(folder: string, volume: string | undefined): Promise<SourceChain> {
  const st = await stat(folder).catch(() => null);
  if (!st?.isDirectory()) throw new UsageError(`source folder ${folder} does not exist`);
  const { images } = await listFolder(folder);
  const volumes = [...new Set(images.map((i) => i.volume))];
  if (volumes.length === 0) throw new UsageError(`${folder} holds no images yet; take a backup first`);
  const vol = volume ?? (volumes.length === 1 ? volumes[0]! : undefined);
  if (!vol) throw new UsageError(`${folder} holds volumes ${volumes.join(', ')}: name one in the job ("volume")`);
  const mine = images.filter((i) => i.volume === vol);
  if (mine.length === 0) throw new UsageError(`${folder} holds no images of volume ${vol} (it has ${volumes.join(', ')})`);
  const newestBase = Math.max(...mine.map((i) => i.base));
  const group = groupChains(mine.filter((i) => i.base === newestBase)).values().next().value ?? [];
  const { files } = await loadChain(group);
  const baseFile = files.find((f) => f.last === 0);
  if (!baseFile) throw new ChainBrokenError(`${folder}: the base of ${vol} chain ${newestBase} is missing or unreadable`);
  return { volume: vol, base: newestBase, chainId: baseFile.header.chainId.toString('hex'), files };
}

function pointOf(file: ChainFile, path: ChainFile[]): SourcePoint {
  return { point: file.last, pointId: file.header.endPointId.toString('hex'), time: file.header.pointTime, path };
}

/** The base point of a chain. */
export function basePoint(chain: SourceChain): SourcePoint {
  const base = chain.files.find((f) => f.last === 0)!;
  return pointOf(base, [base]);
}

/**
 * The newest point the lag policy allows whose whole path is sound, or null when none is.
 * `after` (a point number) skips points not newer than it: nothing to apply.
 */
export async function chooseTarget(folder: string, chain: SourceChain, lag: Lag, now: number, after = -1): Promise<SourcePoint | null> {
  const bad = await readBadLog(badLogPath(folder, chain.volume, chain.base));
  const state = await loadState(folder);
  const sound = new Map<string, boolean>();
  const isSound = async (f: ChainFile): Promise<boolean> => {
    const known = sound.get(f.name);
    if (known !== undefined) return known;
    let ok: boolean;
    if (bad.has(f.name)) ok = false;
    else {
      const st = await stat(f.path);
      const rec = currentState(state, f.name, st.size, st.mtimeMs);
      const verdict = rec?.deep?.ok === false || rec?.quick?.ok === false ? false : rec?.quick?.ok || rec?.deep?.ok ? true : null;
      ok = verdict ?? (await quickVerify(f.path)).ok;
    }
    sound.set(f.name, ok);
    return ok;
  };

  const ends = [...new Set(chain.files.map((f) => f.last))].filter((p) => p > after).sort((a, b) => b - a);
  for (const p of ends) {
    const file = bestEndingAt(chain.files, p)!;
    if (lag.kind === 'hours' && file.header.pointTime > now - lag.hours * 3600_000) continue;
    if (lag.kind === 'daily' && p !== 0 && !chain.files.some((f) => f.last === p && (f.levelBits & LEVEL_BITS.cd) !== 0)) continue;
    let path: ChainFile[];
    try {
      path = dependencyPath(file, chain.files);
    } catch (e) {
      if (e instanceof ChainBrokenError) continue;
      throw e;
    }
    let ok = true;
    for (const f of path) {
      if (!(await isSound(f))) {
        ok = false;
        break;
      }
    }
    if (ok) return pointOf(file, path);
  }
  return null;
}
