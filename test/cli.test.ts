// Proves the command line's contract: --help explains every command, usage errors are one line with exit 2, Ctrl-C leaves nothing behind.
import t from 'tap';
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { BIN, imagekeep, tempDir } from './helpers/cli.js';

t.test('help', async (t) => {
  const r = await imagekeep(['--help']);
  t.equal(r.code, 0);
  for (const c of ['backup', 'ls', 'qp', 'export', 'restore']) t.match(r.stdout, new RegExp(`\\n  ${c} `), `lists ${c}`);
  const b = await imagekeep(['help', 'backup']);
  for (const flag of ['--volume', '--full', '--at', '--forensic', '--block-size', '--compress', '--password-file', '--changed-blocks', '--pre', '--post', '--json']) {
    t.match(b.stdout, flag, `backup --help names ${flag}`);
  }
});

t.test('usage errors', async (t) => {
  for (const args of [['bogus'], ['backup'], ['backup', 'a', 'b', '--compress', 'lzma'], ['backup', 'a', 'b', '--at', 'yesterday']]) {
    const r = await imagekeep(args);
    t.equal(r.code, 2, `${args.join(' ')}: exit 2`);
    t.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line (${r.stderr.trim()})`);
    t.match(r.stderr, /^imagekeep: /);
  }
});

t.test('an interrupted backup leaves nothing behind', async (t) => {
  const { dir, cleanup } = await tempDir('sigint');
  t.teardown(cleanup);
  const src = join(dir, 'big.raw');
  const { open } = await import('node:fs/promises');
  const h = await open(src, 'w');
  await h.truncate(4 * 2 ** 30);
  await h.close();
  const folder = join(dir, 'f');
  const p = spawn(process.execPath, [BIN, 'backup', src, folder, '--forensic'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  p.stderr.on('data', (d) => (stderr += d));
  // Interrupt only once the backup is writing: its temporary image exists.
  for (let waited = 0; waited < 60_000; waited += 50) {
    const names = await readdir(folder).catch(() => [] as string[]);
    if (names.some((n) => n.startsWith('.imagekeep-tmp-'))) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  p.kill('SIGINT');
  const code = await new Promise<number | null>((r) => p.on('close', r));
  t.equal(code, 130, 'exit 130');
  t.match(stderr, /interrupted by SIGINT; nothing was written under a final name/);
  t.same(await readdir(folder), [], 'no image, no temporary file, no lock');
});
