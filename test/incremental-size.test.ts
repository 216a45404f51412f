// Proves an incremental after 10 MiB of changes on a 1 GiB disk stores at most the changed bytes plus one block per changed extent plus its index, and reads back exactly.
import t from 'tap';
import { join } from 'node:path';
import { stat } from 'node:fs/promises';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';
import { ImageFile } from '../src/chain/image/reader.js';

t.test('incremental size follows the changed data', async (t) => {
  const { dir, cleanup } = await tempDir('incsize');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  await makeRawDisk(src, 2 ** 30, 3, 64 * 2 ** 20);
  t.equal((await imagekeep(['backup', src, folder, '--at', '2026-01-01T00:00:00Z'])).code, 0);
  // 10 MiB of random (incompressible) changes in 40 extents at unaligned offsets.
  const extents = await scribble(src, 4, 40, 2 * 10 * 2 ** 20 / 40);
  const changed = extents.reduce((s, e) => s + e.length, 0);
  const r = await imagekeep(['backup', src, folder, '--at', '2026-01-01T01:00:00Z', '--json']);
  t.equal(r.code, 0, r.stderr);
  const inc = join(folder, 'C_VOL-b001-i001.spi');
  const image = await ImageFile.open(inc);
  const indexBytes = image.trailer.indexLength;
  const blockSize = image.header.blockSize;
  await image.close();
  const size = (await stat(inc)).size;
  const stored = size - 4096 - 64 - indexBytes;
  const bound = changed + extents.length * blockSize;
  t.ok(stored <= bound, `stored ${stored} B of records <= ${changed} changed + ${extents.length} x ${blockSize} (${bound})`);
  t.ok(indexBytes <= 32 + 32 * (bound / blockSize + extents.length), `index ${indexBytes} B`);
  const out = join(dir, 'out.raw');
  t.equal((await imagekeep(['export', inc, out])).code, 0);
  t.equal(await sha256File(out), await sha256File(src), 'the incremental point reads as the changed disk');
});
