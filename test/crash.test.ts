// Proves that `backup` killed at every durable step (IMAGEKEEP_CRASH_AT=k) leaves a valid folder and the next backup works.
import t from 'tap';
import { createHash } from 'node:crypto';
import { cp, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { describeFolder } from '../src/chain/describe.js';
import { KeyRing } from '../src/chain/image/reader.js';
import { openPoint } from '../src/chain/open.js';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

/** sha256 of an image's point in time, read whole through the library. */
async function pointSha(image: string): Promise<string> {
  const { point } = await openPoint(image, new KeyRing(null));
  try {
    const all = Buffer.alloc(point.size);
    await point.read(all, 0);
    return createHash('sha256').update(all).digest('hex');
  } finally {
    await point.close();
  }
}

t.test('every durable step of a small incremental', async (t) => {
  // On tmpfs: a killed process loses nothing the page cache holds, and fsync costs nothing there.
  const { dir, cleanup } = await tempDir('crash', '/dev/shm');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const template = join(dir, 'template');
  await makeRawDisk(src, 8 * 2 ** 20 + 512 * 3, 7, 2 * 2 ** 20);
  const hashes: string[] = [await sha256File(src)];
  t.equal((await imagekeep(['backup', src, template, '--at', '2026-01-01T00:00:00Z'])).code, 0);
  await scribble(src, 8, 5, 100_000);
  hashes.push(await sha256File(src));
  t.equal((await imagekeep(['backup', src, template, '--at', '2026-01-01T01:00:00Z'])).code, 0);
  await scribble(src, 9, 5, 100_000);
  const newHash = await sha256File(src);

  // The crash and the next backup are the command; the checks (listing the folder, reading every
  // point) run in-process through the library the command calls, which saves five node start-ups
  // per k. The first k also checks that `imagekeep ls --json` reports what the library does and
  // that `imagekeep export` reads the newest point.
  let completedAt = 0;
  for (let k = 1; k < 200; k++) {
    const folder = join(dir, `k${k}`);
    await cp(template, folder, { recursive: true });
    const r = await imagekeep(['backup', src, folder, '--at', '2026-01-01T02:00:00Z'], { IMAGEKEEP_CRASH_AT: String(k) });
    if (r.code === 0) {
      completedAt = k;
      await rm(folder, { recursive: true });
      break;
    }
    t.equal(r.code, 137, `k=${k}: killed`);
    // The folder is valid: every image under a final name opens and reads its point.
    const listing = await describeFolder(folder);
    if (k === 1) {
      const ls = await imagekeep(['ls', folder, '--json']);
      t.equal(ls.code, 0, `k=${k}: ls works`);
      t.same(JSON.parse(ls.stdout), JSON.parse(JSON.stringify(listing)), `k=${k}: imagekeep ls --json shows what describeFolder finds`);
    }
    const chain = listing.chains[0]!;
    t.same(chain.problems, [], `k=${k}: no unreadable files`);
    const names = chain.files.map((f) => f.name);
    t.ok(names.length === 2 || names.length === 3, `k=${k}: ${names.join(' ')}`);
    // The next backup works (a finished image is there already or gets written now).
    const again = await imagekeep(['backup', src, folder, '--at', '2026-01-01T03:00:00Z']);
    t.equal(again.code, 0, `k=${k}: next backup works ${again.stderr}`);
    const after = await readdir(folder);
    t.same(after.filter((n) => n.startsWith('.imagekeep-tmp-')), [], `k=${k}: no temporary files left`);
    const final = (await describeFolder(folder)).chains[0]!.files;
    for (const f of final) {
      t.equal(f.md5, 'present', `k=${k}: ${f.name} has its .md5`);
      t.equal(await pointSha(join(folder, f.name)), f.last < 2 ? hashes[f.last] : newHash, `k=${k}: ${f.name} reads its point`);
    }
    if (k === 1) {
      const newest = final.at(-1)!;
      const out = join(dir, `k${k}-${newest.last}.raw`);
      t.equal((await imagekeep(['export', join(folder, newest.name), out])).code, 0);
      t.equal(await sha256File(out), newHash, `k=${k}: imagekeep export of ${newest.name} reads its point`);
      await rm(out);
    }
    await rm(folder, { recursive: true });
  }
  t.ok(completedAt > 5, `the backup has ${completedAt - 1} durable steps, each crashed once`);
});
