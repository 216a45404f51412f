// Proves a collapse yields exactly its end point (blocks that became zero included), replaces its sources on the dependency path, and costs what the sources hold.
import t from 'tap';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { collapse } from '../src/chain/collapse.js';
import { groupChains, listFolder, loadChain } from '../src/chain/folder.js';
import { dependencyPath } from '../src/chain/path.js';
import { LEVEL_BITS } from '../src/chain/image/layout.js';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

for (const workers of [false, true]) t.test(`collapse of five incrementals (${workers ? 'MD5 and read-back check in workers' : 'on the calling thread'})`, async (t) => {
  const { dir, cleanup } = await tempDir('collapse');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  await makeRawDisk(src, 16 * 2 ** 20 + 4096, 51, 6 * 2 ** 20);
  const hashes: string[] = [];
  for (let i = 0; i <= 6; i++) {
    if (i > 0) await scribble(src, 500 + i, 4, 100_000);
    if (i === 3) {
      // A block that holds data becomes zero: the collapse must keep the zero entry.
      const h = await open(src, 'r+');
      await h.write(Buffer.alloc(3 * 65536), 0, 3 * 65536, 65536 * 10);
      await h.close();
    }
    hashes.push(await sha256File(src));
    t.equal((await imagekeep(['backup', src, folder, '--at', `2026-09-01T0${i}:00:00Z`])).code, 0);
  }
  const chain = (await loadChain(groupChains((await listFolder(folder)).images).get('C_VOL-b001')!)).files;
  const i5 = chain.find((f) => f.name === 'C_VOL-b001-i005.spi')!;
  const sources = dependencyPath(i5, chain).filter((f) => f.last >= 1);
  t.same(sources.map((s) => s.name), ['C_VOL-b001-i005.spi', 'C_VOL-b001-i004.spi', 'C_VOL-b001-i003.spi', 'C_VOL-b001-i002.spi', 'C_VOL-b001-i001.spi']);
  const r = await collapse(folder, sources, { first: 1, last: 5, levelBits: LEVEL_BITS.cd }, { now: Date.parse('2026-09-02T00:05:00Z'), workers });
  t.equal(r.name, 'C_VOL-b001-i005-cd.spi');

  const qp = await imagekeep(['qp', join(folder, 'C_VOL-b001-i006.spi')]);
  t.equal(qp.stdout, 'C_VOL-b001-i006.spi\nC_VOL-b001-i005-cd.spi\nC_VOL-b001.spf\n', 'the path now goes through the collapse');
  for (const [name, want] of [['C_VOL-b001-i005-cd.spi', hashes[5]], ['C_VOL-b001-i006.spi', hashes[6]]] as const) {
    const out = join(dir, `${name}.raw`);
    t.equal((await imagekeep(['export', join(folder, name), out])).code, 0);
    t.equal(await sha256File(out), want, `${name} reads the disk as it was at its point`);
  }
  const ls = JSON.parse((await imagekeep(['ls', folder, '--json'])).stdout).chains[0].files as { name: string; pointTime: string }[];
  t.equal(ls.find((f) => f.name === 'C_VOL-b001-i005-cd.spi')!.pointTime, '2026-09-01T05:00:00.000Z', 'the collapse ends at the point of i005');
  const { stat } = await import('node:fs/promises');
  t.equal((await stat(join(folder, 'C_VOL-b001-i005-cd.spi'))).mtime.toISOString(), '2026-09-01T05:00:00.000Z', 'mtime of the last image included');
  t.equal((await stat(join(folder, 'C_VOL-b001-i005-cd.md5'))).mtime.toISOString(), '2026-09-02T00:05:00.000Z', '.md5 carries the collapse time');
  let sourceBytes = 0;
  for (const s of sources) sourceBytes += (await stat(s.path)).size;
  t.ok(r.bytes <= sourceBytes, `the collapse (${r.bytes} B) is no larger than its sources (${sourceBytes} B)`);
  t.equal((await imagekeep(['verify', folder, '--deep'])).code, 0, 'everything verifies');
});
