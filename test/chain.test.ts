// Proves a --forensic full and 30 incrementals of a 1 GiB GPT disk (NTFS + ext4, files changing) export every point byte-identical to the disk as it was.
import t from 'tap';
import { join } from 'node:path';
import { rm } from 'node:fs/promises';
import { makeDisk } from '../src/devkit/index.js';
import { backup } from '../src/chain/backup.js';
import { exportRaw } from '../src/chain/export.js';
import { openPoint } from '../src/chain/open.js';
import { KeyRing } from '../src/chain/image/reader.js';
import type { PointInTime } from '../src/chain/point.js';
import { imagekeep, tempDir } from './helpers/cli.js';
import { ContentDigest, contentDigestOfFile } from './helpers/content-digest.js';

/** The point read whole through the library, as a content digest (helpers/content-digest.ts). */
async function hashPoint(point: PointInTime): Promise<string> {
  const h = new ContentDigest();
  const per = Math.floor(8 * 2 ** 20 / point.blockSize);
  const buf = Buffer.alloc(per * point.blockSize);
  for (let b = 0; b < point.blockCount; b += per) {
    const n = Math.min(per, point.blockCount - b);
    const len = Math.min((b + n) * point.blockSize, point.size) - b * point.blockSize;
    await point.readBlocks(b, n, buf.subarray(0, len));
    h.update(buf.subarray(0, len));
  }
  return h.digest();
}

t.test('the content digest tells contents apart', async (t) => {
  const of = (...pieces: Buffer[]) => {
    const d = new ContentDigest();
    for (const p of pieces) d.update(p);
    return d.digest();
  };
  const data = Buffer.alloc(4 * 65536, 7);
  const flipped = Buffer.from(data);
  flipped[3 * 65536 + 5] = 8;
  const zero = Buffer.alloc(65536);
  t.equal(of(data, zero), of(Buffer.concat([data, zero])), 'the same content fed in other pieces');
  t.not(of(data, zero), of(flipped, zero), 'one byte changed');
  t.not(of(data, zero), of(data), 'one zero chunk fewer at the end');
  t.not(of(zero, data), of(data, zero), 'the same chunks at other offsets');
});

t.test('31 points of a changing 1 GiB disk', async (t) => {
  const { dir, cleanup } = await tempDir('chain');
  t.teardown(cleanup);
  const disk = await makeDisk({ path: join(dir, 'disk.img'), size: 2 ** 30, seed: 42, tmpDir: dir });
  t.teardown(() => disk.cleanup());
  const folder = join(dir, 'backups');
  const recorded: { image: string; sha: string }[] = [];
  const start = Date.parse('2026-05-01T08:00:00Z');
  for (let n = 0; n <= 30; n++) {
    if (n > 0) await disk.mutate({ seed: 1000 + n, create: 3, modify: 3, remove: 1, bytes: 3 * 2 ** 20 });
    // A digest of the content that skips the zero chunks, most of this sparse disk: equal
    // only for byte-identical contents, at a fraction of a whole-file sha256's cost.
    const sha = await contentDigestOfFile(disk.path);
    // The full encodes on worker threads, as the command does; the incrementals on this thread.
    // Under the test runner each worker loads the TypeScript loader first, which cost about
    // 4 CPU-seconds per backup, six times the incremental itself; the blocks are encoded by the
    // same code either way, and a chain mixing the two must read back the same.
    const r = await backup(disk.path, folder, { forensic: true, at: start + n * 4 * 3600_000, workers: n === 0 ? undefined : 0 });
    recorded.push({ image: r.path, sha });
  }
  t.equal(new Set(recorded.map((r) => r.sha)).size, 31, 'every point differs from the others');
  // Every point read whole through the library (exportRaw's own file writing is checked
  // on two of them and through the command line below).
  for (const [n, { image, sha }] of recorded.entries()) {
    const { point } = await openPoint(image, new KeyRing(null));
    try {
      if (n % 15 === 0) {
        const out = join(dir, `point-${n}.raw`);
        await exportRaw(point, out);
        t.equal(await contentDigestOfFile(out), sha, `point ${n} (${image.split('/').pop()}) exports byte-identical to the disk as it was`);
        await rm(out);
      } else {
        t.equal(await hashPoint(point), sha, `point ${n} (${image.split('/').pop()}) reads byte-identical to the disk as it was`);
      }
    } finally {
      await point.close();
    }
  }
  // The command line reads the same as the library.
  const mid = recorded[15]!;
  const out = join(dir, 'cli.raw');
  const r = await imagekeep(['export', mid.image, out, '--json']);
  t.equal(r.code, 0, r.stderr);
  t.equal(JSON.parse(r.stdout).bytes, 2 ** 30);
  t.equal(await contentDigestOfFile(out), mid.sha, 'imagekeep export of point 15');
});
