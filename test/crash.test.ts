// Proves that `backup` killed at every durable step (IMAGEKEEP_CRASH_AT=k) leaves a valid folder and the next backup works.
import t from 'tap';
import { cp, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

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
    const ls = await imagekeep(['ls', folder, '--json']);
    t.equal(ls.code, 0, `k=${k}: ls works`);
    const chain = JSON.parse(ls.stdout).chains[0];
    t.same(chain.problems, [], `k=${k}: no unreadable files`);
    const names: string[] = chain.files.map((f: { name: string }) => f.name);
    t.ok(names.length === 2 || names.length === 3, `k=${k}: ${names.join(' ')}`);
    // The next backup works (a finished image is there already or gets written now).
    const again = await imagekeep(['backup', src, folder, '--at', '2026-01-01T03:00:00Z']);
    t.equal(again.code, 0, `k=${k}: next backup works ${again.stderr}`);
    const after = await readdir(folder);
    t.same(after.filter((n) => n.startsWith('.imagekeep-tmp-')), [], `k=${k}: no temporary files left`);
    const final = JSON.parse((await imagekeep(['ls', folder, '--json'])).stdout).chains[0].files as { name: string; last: number; md5: string }[];
    for (const f of final) {
      t.equal(f.md5, 'present', `k=${k}: ${f.name} has its .md5`);
      const out = join(dir, `k${k}-${f.last}.raw`);
      t.equal((await imagekeep(['export', join(folder, f.name), out])).code, 0);
      t.equal(await sha256File(out), f.last < 2 ? hashes[f.last] : newHash, `k=${k}: ${f.name} reads its point`);
      await rm(out);
    }
    await rm(folder, { recursive: true });
  }
  t.ok(completedAt > 5, `the backup has ${completedAt - 1} durable steps, each crashed once`);
});
