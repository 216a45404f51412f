/**
 * Verification (SPEC §6). Quick: the MD5 of the whole file against its .md5 sidecar. Deep:
 * the header, trailer and index checksums, then every record decrypted, decompressed and
 * checked against its block digest, so a damaged image is caught even when its .md5 was
 * regenerated from the damaged bytes.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { basename } from 'node:path';
import { ImagekeepError } from '../formats/errors.js';
import { ImageFile, KeyRing } from './image/reader.js';
import { readSidecar } from './sidecar.js';

export interface FileCheck {
  name: string;
  ok: boolean;
  /** what failed, in one line; absent when ok */
  reason?: string;
  md5?: string;
  sidecar: 'present' | 'missing';
  /** deep only: did the structure and every block check out (whatever the sidecar says)? */
  blocksOk?: boolean;
}

/** MD5 of a whole file, with two reads in flight so hashing and reading overlap. */
export async function md5OfFile(path: string, signal?: AbortSignal): Promise<string> {
  const h = await open(path, 'r');
  try {
    const size = (await h.stat()).size;
    const md5 = createHash('md5');
    const chunk = 4 * 1024 * 1024;
    const bufs = [Buffer.allocUnsafe(chunk), Buffer.allocUnsafe(chunk)];
    let next: Promise<number> | null = size > 0 ? h.read(bufs[0]!, 0, Math.min(chunk, size), 0).then((r) => r.bytesRead) : null;
    for (let at = 0, k = 0; next; k ^= 1) {
      if (signal?.aborted) throw signal.reason ?? new Error('aborted');
      const n = await next;
      const cur = bufs[k]!;
      at += n;
      next = at < size && n > 0 ? h.read(bufs[k ^ 1]!, 0, Math.min(chunk, size - at), at).then((r) => r.bytesRead) : null;
      md5.update(cur.subarray(0, n));
    }
    return md5.digest('hex');
  } finally {
    await h.close();
  }
}

export async function quickVerify(path: string): Promise<FileCheck> {
  const name = basename(path);
  let want: string | null;
  try {
    want = await readSidecar(path, name);
  } catch (e) {
    return { name, ok: false, reason: (e as Error).message, sidecar: 'present' };
  }
  if (want === null) return { name, ok: false, reason: 'no .md5 sidecar (counts as corrupt until verify --deep --repair re-creates it)', sidecar: 'missing' };
  const got = await md5OfFile(path);
  if (got !== want) return { name, ok: false, reason: `MD5 ${got} does not match its .md5 (${want})`, md5: got, sidecar: 'present' };
  return { name, ok: true, md5: got, sidecar: 'present' };
}

/** Every record decoded and checked; throws CorruptImageError naming the first bad block. */
export async function deepCheck(image: ImageFile, signal?: AbortSignal): Promise<void> {
  const ix = image.index;
  // Records are read in file order in runs of up to 8 MiB, then decoded one by one.
  let i = 0;
  while (i < ix.count) {
    if (signal?.aborted) throw signal.reason ?? new Error('aborted');
    let j = i;
    let bytes = 0;
    while (j < ix.count && (bytes === 0 || bytes + ix.storedLengths[j]! <= 8 * 1024 * 1024)) bytes += ix.storedLengths[j++]!;
    const run = await image.readRecords(i, j);
    let at = 0;
    for (let k = i; k < j; k++) {
      const len = ix.storedLengths[k]!;
      if (!image.isZero(k)) image.decodeRecord(k, run.subarray(at, at + len));
      at += len;
    }
    i = j;
  }
}

/** Deep verification of one file: structure, every block, and the sidecar when present. */
export async function deepVerify(path: string, keyring: KeyRing): Promise<FileCheck> {
  const name = basename(path);
  let image: ImageFile;
  try {
    image = await ImageFile.open(path, keyring);
  } catch (e) {
    if (e instanceof ImagekeepError) return { name, ok: false, reason: e.message.replace(`${name}: `, ''), sidecar: 'present', blocksOk: false };
    throw e;
  }
  try {
    await deepCheck(image);
  } catch (e) {
    if (e instanceof ImagekeepError) return { name, ok: false, reason: e.message.replace(`${name}: `, ''), sidecar: 'present', blocksOk: false };
    throw e;
  } finally {
    await image.close();
  }
  return { ...(await quickVerify(path)), blocksOk: true };
}
