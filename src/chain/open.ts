/**
 * From a file name to a readable point: list the folder, read the chain's headers, find
 * the dependency path, open its images (indexes only) and check every link.
 */
import { basename, dirname, resolve } from 'node:path';
import { stat } from 'node:fs/promises';
import { ChainBrokenError, ForeignFormatError, UsageError } from '../formats/errors.js';
import { groupChains, listFolder, loadChain, type ChainFile } from './folder.js';
import { TEMP_PREFIX } from './durable.js';
import { dependencyPath } from './path.js';
import { PointInTime } from './point.js';
import { KeyRing } from './image/reader.js';
import { chainKey, looksLikeImageName, parseImageName } from './names.js';

/** The chain's files (headers read) and the dependency path of `imagePath`. */
export async function resolvePath(imagePath: string): Promise<{ chain: ChainFile[]; path: ChainFile[]; target: ChainFile }> {
  const abs = resolve(imagePath);
  const name = basename(abs);
  await stat(abs).catch(() => {
    throw new UsageError(`${imagePath} does not exist`);
  });
  if (name.startsWith(TEMP_PREFIX)) {
    throw new UsageError(`${name} is the temporary file of an unfinished write, not an image; the next backup or process in its folder removes it`);
  }
  const parsed = parseImageName(name);
  if (!parsed) {
    if (looksLikeImageName(name)) throw new ForeignFormatError(`${name} is not named as an imagekeep image (VOLUME-bNNN.spf or VOLUME-bNNN-iNNN[-cd…].spi)`);
    throw new UsageError(`${name} is not an image file (.spf or .spi)`);
  }
  const { images } = await listFolder(dirname(abs));
  const mine = groupChains(images).get(chainKey(parsed.volume, parsed.base)) ?? [];
  const { files, unreadable } = await loadChain(mine);
  const bad = unreadable.find((u) => u.image.name === name);
  if (bad) throw bad.error;
  const target = files.find((f) => f.name === name);
  if (!target) throw new UsageError(`${name} is not an image of ${dirname(abs)}`);
  let path: ChainFile[];
  try {
    path = dependencyPath(target, files);
  } catch (e) {
    // A file on the way that could not be read explains the break better than "missing".
    if (e instanceof ChainBrokenError && unreadable.length > 0) throw unreadable[0]!.error;
    throw e;
  }
  return { chain: files, path, target };
}

export async function openPoint(imagePath: string, keyring: KeyRing): Promise<{ point: PointInTime; path: ChainFile[] }> {
  const { path } = await resolvePath(imagePath);
  const point = await PointInTime.open(path.map((f) => f.path), keyring);
  return { point, path };
}
