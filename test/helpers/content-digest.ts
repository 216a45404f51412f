// A digest of a disk's content that costs only its data: SHA-256 over (offset, bytes) of every
// 64 KiB chunk that is not all zero. Equal contents of equal size give equal digests and, SHA-256
// being what it is, different contents different ones, so it stands in for a whole-file sha256
// as a test's oracle while skipping the zeros (most of a sparse test disk) that cost the most.
import { createHash, type Hash } from 'node:crypto';
import { open } from 'node:fs/promises';

const CHUNK = 64 * 1024;
const ZERO = Buffer.alloc(CHUNK);

/** A running content digest; feed it the disk in order, any piece sizes. */
export class ContentDigest {
  private readonly hash: Hash = createHash('sha256');
  private readonly offset = Buffer.alloc(8);
  private at = 0;

  /** The next `data.length` bytes of the disk (pieces must be whole chunks, but the last). */
  update(data: Uint8Array): void {
    if (this.at % CHUNK !== 0) throw new Error('ContentDigest: pieces must be whole 64 KiB chunks but the last');
    for (let i = 0; i < data.length; i += CHUNK) {
      const chunk = data.subarray(i, Math.min(i + CHUNK, data.length));
      if (ZERO.compare(chunk, 0, chunk.length, 0, chunk.length) === 0 && chunk.length === CHUNK) continue;
      this.offset.writeBigUInt64LE(BigInt(this.at + i));
      this.hash.update(this.offset).update(chunk);
    }
    this.at += data.length;
  }

  /** The digest, with the total size in it (so trailing zeros count). */
  digest(): string {
    this.offset.writeBigUInt64LE(BigInt(this.at));
    return this.hash.update('size').update(this.offset).digest('hex');
  }
}

export async function contentDigestOfFile(path: string): Promise<string> {
  const d = new ContentDigest();
  const f = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(64 * CHUNK);
    for (;;) {
      const { bytesRead } = await f.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      d.update(buf.subarray(0, bytesRead));
    }
  } finally {
    await f.close();
  }
  return d.digest();
}
