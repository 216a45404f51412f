/**
 * `--changed-blocks FILE`: the byte ranges a caller knows changed since the previous point
 * (a hypervisor's CBT, a dirty bitmap). One range a line, "OFFSET LENGTH" in bytes, decimal
 * or 0x-hex; '#' starts a comment. Returns one flag byte per block.
 */
import { readFile } from 'node:fs/promises';
import { UsageError } from '../formats/errors.js';

export async function readChangedBlocks(path: string, deviceSize: number, blockSize: number): Promise<Uint8Array> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new UsageError(`--changed-blocks ${path} cannot be read`);
  }
  const mask = new Uint8Array(Math.ceil(deviceSize / blockSize));
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/#.*/, '').trim();
    if (!line) return;
    const [a, b, extra] = line.split(/\s+/);
    const offset = Number(a);
    const length = Number(b);
    if (extra !== undefined || !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > deviceSize) {
      throw new UsageError(`--changed-blocks ${path} line ${i + 1}: "${raw.trim()}" is not "OFFSET LENGTH" within the ${deviceSize}-byte source`);
    }
    const first = Math.floor(offset / blockSize);
    const last = Math.floor((offset + length - 1) / blockSize);
    mask.fill(1, first, last + 1);
  });
  return mask;
}
