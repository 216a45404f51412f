// Proves the --writable overlay against a plain buffer model: random and concurrent writes (partial blocks, the short last block, offsets past 4 GiB) read back as the model says, the point below is never written, the file stays sparse, an encrypted overlay holds no plaintext, and close() removes the file.
import t from 'tap';
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Overlay } from '../src/mount/overlay.js';
import type { BlockDevice } from '../src/formats/types.js';
import { prng, tempDir } from './helpers/cli.js';

/** A read-only device whose byte N is a function of N (no storage), counting writes attempted on it. */
function formulaDevice(size: number): BlockDevice & { writes: number } {
  return {
    size,
    writes: 0,
    async read(into: Uint8Array, at: number) {
      if (at < 0 || at + into.length > size) throw new RangeError(`read at ${at} + ${into.length} past ${size}`);
      for (let i = 0; i < into.length; i++) into[i] = ((at + i) * 2654435761) % 251;
    },
    async close() {},
  };
}

function model(dev: BlockDevice & { size: number }): Buffer {
  const b = Buffer.alloc(dev.size);
  for (let i = 0; i < b.length; i++) b[i] = (i * 2654435761) % 251;
  return b;
}

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

for (const encrypt of [false, true]) {
  t.test(`random and concurrent writes, ${encrypt ? 'encrypted' : 'plain'} overlay`, async (t) => {
    const { dir, cleanup } = await tempDir('overlay');
    t.teardown(cleanup);
    // Not a multiple of 4096: the last overlay block is 1536 bytes.
    const lower = formulaDevice(3 * 2 ** 20 + 1536);
    const want = model(lower);
    const path = join(dir, 'overlay.img');
    const o = await Overlay.create(lower, path, { encrypt });
    const rnd = prng(encrypt ? 2 : 1);
    const int = (n: number): number => rnd(4).readUInt32LE(0) % n;
    // Rounds of 16 writes issued at once (overlapping ones included), then whole and random reads.
    for (let round = 0; round < 8; round++) {
      const writes = Array.from({ length: 16 }, () => {
        const length = 1 + int(round % 2 ? 600 : 20_000);
        const at = round === 7 ? lower.size - length : int(lower.size - length);
        return { at, data: rnd(length) };
      });
      await Promise.all(writes.map((w) => o.write(w.data, w.at)));
      // Queued in issue order, so the model applies them in that order too.
      for (const w of writes) w.data.copy(want, w.at);
      const all = Buffer.alloc(lower.size);
      await o.read(all, 0);
      t.equal(sha(all), sha(want), `round ${round}: the whole device reads as the model`);
      for (let i = 0; i < 20; i++) {
        const length = 1 + int(9000);
        const at = int(lower.size - length);
        const got = Buffer.alloc(length);
        await o.read(got, at);
        if (!got.equals(want.subarray(at, at + length))) t.fail(`round ${round}: ${length} bytes at ${at} differ`);
      }
    }
    await t.rejects(o.write(Buffer.alloc(2), lower.size - 1), { name: 'RangeError' }, 'a write past the end is refused');
    const file = await readFile(path);
    const written = want.subarray(lower.size - 64);
    t.equal(file.indexOf(written) >= 0, !encrypt, encrypt ? 'the file does not hold the written bytes in the clear' : 'the file holds the written bytes');
    t.ok(o.bytesHeld > 0 && o.bytesHeld <= Math.ceil(lower.size / 4096) * 4096, `${o.bytesHeld} bytes held`);
    await o.close();
    await t.rejects(stat(path), { code: 'ENOENT' }, 'close() removes the file');
  });
}

t.test('offsets past 4 GiB on a 6 GiB device; the file stays sparse', async (t) => {
  const { dir, cleanup } = await tempDir('overlay-big');
  t.teardown(cleanup);
  const size = 6 * 2 ** 30 + 512;
  const lower = formulaDevice(size);
  const path = join(dir, 'overlay.img');
  const o = await Overlay.create(lower, path);
  const spots = [2 ** 32 - 100, 2 ** 32 + 3 * 4096 + 4095, 5 * 2 ** 30 + 7, size - 300];
  const data = prng(9)(5000);
  for (const at of spots) await o.write(data.subarray(0, Math.min(5000, size - at)), at);
  for (const at of spots) {
    const n = Math.min(5000, size - at);
    const got = Buffer.alloc(n + 200);
    const from = Math.max(0, at - 100);
    const span = Math.min(got.length, size - from);
    await o.read(got.subarray(0, span), from);
    const expect = Buffer.alloc(span);
    await lower.read(expect, from);
    data.copy(expect, at - from, 0, Math.min(n, span - (at - from)));
    t.ok(got.subarray(0, span).equals(expect), `written at ${at}: read back with the point's bytes around it`);
  }
  const st = await stat(path);
  t.ok(st.blocks * 512 <= 256 * 1024, `${st.blocks * 512} bytes allocated for writes at ${spots.length} places of a ${size}-byte device`);
  await o.close();
});
