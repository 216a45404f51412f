/**
 * What a backup folder holds: image files grouped into chains by (volume, base). Names
 * come from the directory listing; the covered range and point ids from each file's
 * 4 KiB header, because linkage is decided by content, never by name alone.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { ImagekeepError } from '../formats/errors.js';
import { LocalFile } from '../formats/local-file.js';
import { HEADER_SIZE, decodeHeader, type ImageHeader } from './image/layout.js';
import { TEMP_PREFIX } from './durable.js';
import { chainKey, parseImageName, type ImageName } from './names.js';

export interface FolderImage extends ImageName {
  name: string;
  path: string;
}

export interface ChainFile extends FolderImage {
  header: ImageHeader;
  /** first incremental covered (from the header); 0 for a base */
  first: number;
}

export interface FolderListing {
  images: FolderImage[];
  /** names that look like images but do not parse as ours */
  strays: string[];
}

export async function listFolder(dir: string): Promise<FolderListing> {
  const images: FolderImage[] = [];
  const strays: string[] = [];
  for (const name of (await readdir(dir)).sort()) {
    if (name.startsWith(TEMP_PREFIX)) continue;
    const parsed = parseImageName(name);
    if (parsed) images.push({ ...parsed, name, path: join(dir, name) });
    else if (/\.(spf|spi)$/i.test(name)) strays.push(name);
  }
  return { images, strays };
}

export function groupChains<T extends FolderImage>(images: T[]): Map<string, T[]> {
  const chains = new Map<string, T[]>();
  for (const im of images) {
    const key = chainKey(im.volume, im.base);
    let list = chains.get(key);
    if (!list) chains.set(key, (list = []));
    list.push(im);
  }
  return chains;
}

export async function readHeader(path: string, name: string): Promise<ImageHeader> {
  const f = await LocalFile.open(path, 'r');
  try {
    const size = await f.size();
    const b = Buffer.alloc(Math.min(size, HEADER_SIZE));
    await f.read(b, 0);
    return decodeHeader(b, name);
  } finally {
    await f.close();
  }
}

export interface LoadedChain {
  files: ChainFile[];
  /** files whose header could not be read, with the reason */
  unreadable: { image: FolderImage; error: ImagekeepError }[];
}

/** Reads the headers of one chain's files. A header that names another point than the file name is unreadable. */
export async function loadChain(images: FolderImage[]): Promise<LoadedChain> {
  const files: ChainFile[] = [];
  const unreadable: LoadedChain['unreadable'] = [];
  for (const image of images) {
    try {
      const header = await readHeader(image.path, image.name);
      if (header.volume !== image.volume || header.baseNumber !== image.base || header.last !== image.last || header.levelBits !== image.levelBits) {
        throw new ImagekeepError('NAME_MISMATCH', `${image.name}: its header says volume ${header.volume}, base ${header.baseNumber}, last point ${header.last}; the file was renamed or is misplaced`);
      }
      files.push({ ...image, header, first: header.first });
    } catch (e) {
      if (!(e instanceof ImagekeepError)) throw e;
      unreadable.push({ image, error: e });
    }
  }
  return { files, unreadable };
}
