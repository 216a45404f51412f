/**
 * The dependency path of an image (SPEC §4): from the image back to the base, at each step
 * the file that ends at the current point and covers the most (the higher level on a tie),
 * then the point before its range. Pure: works on headers already read.
 */
import { ChainBrokenError } from '../formats/errors.js';
import type { ChainFile } from './folder.js';
import { chainKey, levelRank } from './names.js';

/** The file ending at point `last` that covers the most, or undefined. */
export function bestEndingAt(files: ChainFile[], last: number): ChainFile | undefined {
  let best: ChainFile | undefined;
  for (const f of files) {
    if (f.last !== last) continue;
    if (!best || f.first < best.first || (f.first === best.first && levelRank(f.levelBits) > levelRank(best.levelBits))) best = f;
  }
  return best;
}

/** Newest first, ending with the base. Throws ChainBrokenError when a link is missing. */
export function dependencyPath(target: ChainFile, chain: ChainFile[]): ChainFile[] {
  const path = [target];
  let cur = target.first - 1;
  if (target.last === 0) return path;
  while (cur > 0) {
    const next = bestEndingAt(chain, cur);
    if (!next) {
      throw new ChainBrokenError(`${target.name} needs a file of chain ${chainKey(target.volume, target.base)} that ends at incremental ${cur}, and there is none: the chain is broken (restore the missing file from a replica)`, { missingPoint: cur });
    }
    path.push(next);
    cur = next.first - 1;
  }
  const base = chain.find((f) => f.last === 0);
  if (!base) {
    throw new ChainBrokenError(`${target.name} needs the base ${chainKey(target.volume, target.base)}.spf, which is missing: the chain is broken`, { missingPoint: 0 });
  }
  path.push(base);
  return path;
}

/** The newest point of a chain and the file that best represents it. */
export function newestFile(chain: ChainFile[]): ChainFile | undefined {
  let last = -1;
  for (const f of chain) last = Math.max(last, f.last);
  return last < 0 ? undefined : bestEndingAt(chain, last);
}
