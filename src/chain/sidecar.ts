/**
 * The .md5 sidecar beside every image, in md5sum's format so `md5sum -c` works in the
 * folder: lowercase hex, two spaces, the image's file name, LF. Readers also accept the
 * binary marker (`*name`) and uppercase hex.
 */
import { readFile } from 'node:fs/promises';
import { CorruptImageError } from '../formats/errors.js';

export function sidecarPathFor(imagePath: string): string {
  return imagePath.replace(/\.(spf|spi)$/, '') + '.md5';
}

export function md5SidecarText(md5hex: string, imageName: string): string {
  return `${md5hex.toLowerCase()}  ${imageName}\n`;
}

/** The md5 recorded for `imageName`, or null when the sidecar does not exist. */
export async function readSidecar(imagePath: string, imageName: string): Promise<string | null> {
  let text: string;
  try {
    text = await readFile(sidecarPathFor(imagePath), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
  const m = /^([0-9a-fA-F]{32}) [ *](.+)$/m.exec(text);
  if (!m || m[2]!.trim() !== imageName) {
    throw new CorruptImageError(`${sidecarPathFor(imagePath)} is not an md5 line for ${imageName}`);
  }
  return m[1]!.toLowerCase();
}
