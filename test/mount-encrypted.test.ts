// Proves mount of an encrypted chain: the password from --password-file or IMAGEKEEP_PASSWORD_FILE (as backup and export take it) gives disk.raw as captured; a wrong or missing password fails before mounting with one line and a non-zero exit; a --writable overlay over it never holds the data in the clear.
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../src/chain/backup.js';
import { prng, readFileAt, sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { MiB, mountCommandLine, ourMounts, runNode, sha256Range, unmountLeftovers } from './helpers/mount.js';

t.test('mount an encrypted chain', async (t) => {
  const { dir, cleanup } = await tempDir('mount-enc');
  const env = { IMAGEKEEP_RUN_DIR: join(dir, 'run') };
  const { cli, note } = await mountCommandLine(dir);
  t.comment(`imagekeep: ${note}`);
  const ik = (args: string[], more: Record<string, string> = {}): Promise<RunResult> => runNode([cli, ...args], { ...env, ...more });
  t.teardown(async () => {
    await unmountLeftovers(dir);
    await cleanup();
  });

  // A sparse 32 MiB disk: random runs at a few places, zeros elsewhere; its sha256 recorded now.
  const source = join(dir, 'source.img');
  const bytes = prng(41);
  const fh = await open(source, 'w');
  await fh.truncate(32 * MiB);
  for (const at of [0, 3 * MiB + 4096, 17 * MiB, 31 * MiB]) await fh.write(bytes(MiB), 0, MiB, at);
  await fh.close();
  const sourceSha = await sha256File(source);
  const password = join(dir, 'password.txt');
  const wrong = join(dir, 'wrong.txt');
  await writeFile(password, 'correct horse battery staple\n');
  await writeFile(wrong, 'Tr0ub4dor&3\n');
  const folder = join(dir, 'backups');
  const { path: image } = await backup(source, folder, { forensic: true, workers: 0, password: Buffer.from('correct horse battery staple') });
  const mnt = join(dir, 'mnt');
  await mkdir(mnt);

  await t.test('the right password, from --password-file or IMAGEKEEP_PASSWORD_FILE', async (t) => {
    let r = await ik(['mount', image, mnt, '--password-file', password]);
    t.equal(r.code, 0, r.stderr);
    t.equal(await sha256File(join(mnt, 'disk.raw')), sourceSha, 'disk.raw hashes to the source as generated');
    t.equal((await ik(['umount', mnt])).code, 0);
    r = await ik(['mount', image, mnt], { IMAGEKEEP_PASSWORD_FILE: password });
    t.equal(r.code, 0, r.stderr);
    t.equal(await sha256File(join(mnt, 'disk.raw')), sourceSha, 'the same with IMAGEKEEP_PASSWORD_FILE');
    t.equal((await ik(['umount', mnt])).code, 0);
  });

  await t.test('a wrong or missing password fails before mounting, in one line', async (t) => {
    for (const [what, args, more] of [
      ['a wrong password', ['--password-file', wrong], {}],
      ['a wrong password in IMAGEKEEP_PASSWORD_FILE', [], { IMAGEKEEP_PASSWORD_FILE: wrong }],
      ['no password', [], {}],
    ] as [string, string[], Record<string, string>][]) {
      const r = await ik(['mount', image, mnt, '--files', ...args], more);
      t.not(r.code, 0, `${what}: non-zero exit (${r.code})`);
      t.match(r.stderr, /^imagekeep: .*password/, `${what}: ${r.stderr.trim()}`);
      t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
      t.same(await ourMounts(dir), [], `${what}: nothing mounted`);
      t.same(await readdir(join(dir, 'run')).catch(() => []), [], `${what}: no mount recorded`);
    }
  });

  await t.test('--writable: the overlay of an encrypted chain holds no plaintext', async (t) => {
    const overlays = join(dir, 'overlays');
    await mkdir(overlays);
    const r = await ik(['mount', image, mnt, '--writable', '--overlay-dir', overlays, '--password-file', password, '--json']);
    t.equal(r.code, 0, r.stderr);
    const { overlay } = JSON.parse(r.stdout) as { overlay: string };
    const written = prng(42)(256 * 1024);
    // A partial-block write into the source's random bytes: the rest of that block is copied into the overlay too.
    const partialAt = 3 * MiB + 4096 + 10_000;
    const partial = Buffer.from('x'.repeat(100));
    const f = await open(join(mnt, 'disk.raw'), 'r+');
    await f.write(written, 0, written.length, 8 * MiB);
    await f.write(partial, 0, partial.length, partialAt);
    await f.close();
    t.equal(await sha256Range(join(mnt, 'disk.raw'), 8 * MiB, written.length), createHash('sha256').update(written).digest('hex'), 'the written bytes read back');
    const around = await readFileAt(source, partialAt - 4000, 4000);
    t.same(await readFileAt(join(mnt, 'disk.raw'), partialAt - 4000, 4000), around, 'the bytes before the partial write are the source\'s');
    const held = await readFile(overlay);
    t.ok(held.length >= 8 * MiB + written.length, 'the overlay holds the writes');
    t.equal(held.indexOf(written.subarray(1000, 1064)), -1, 'the written bytes are not in the overlay in the clear');
    // partialAt is 1808 bytes into its 4 KiB overlay block: the 64 bytes before it were copied up with it.
    t.equal(held.indexOf(around.subarray(around.length - 64)), -1, 'nor the source bytes copied up beside a partial write');
    t.equal(held.indexOf(partial.subarray(0, 64)), -1, 'nor the partial write');
    t.equal((await ik(['umount', mnt])).code, 0);
    t.same(await readdir(overlays), [], 'overlay removed');
  });
});
