// Proves SftpFile against a real OpenSSH server on loopback: random I/O matches a local mirror, pipelining keeps call order, truncate/flush/size, host key pinning and connection failures give one clear line, a killed, frozen or full host fails queued writes without hanging, plus the opener, atomic rename, exec and ssh:// parsing.
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { SshConnection } from '../src/formats/ssh/connection.js';
import { SshError } from '../src/formats/ssh/errors.js';
import { isNoSuchFile, remoteExists, remoteRename, remoteStat, remoteUnlink, sftpOpener } from '../src/formats/ssh/opener.js';
import { formatSshTarget, parseSshTarget } from '../src/formats/ssh/target.js';
import { UsageError } from '../src/formats/errors.js';
import { prng } from './helpers/cli.js';
import { sshKeygen, startSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

const sshd = await startSshd();
const conn = await SshConnection.connect(sshd.connectOptions());
t.teardown(async () => {
  await conn.close();
  await sshd.stop();
});
const data = join(sshd.dir, 'data');
mkdirSync(data);

/** Small deterministic integers (mulberry32): rng(n) is in [0, n). */
function rng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return Math.floor((((x ^ (x >>> 14)) >>> 0) / 4294967296) * n);
  };
}

/** A growable local copy of what the remote file should hold. */
class Mirror {
  bytes = Buffer.alloc(0);
  write(buf: Uint8Array, at: number): void {
    this.ensure(at + buf.length);
    this.bytes.set(buf, at);
  }
  ensure(end: number): void {
    if (end <= this.bytes.length) return;
    const grown = Buffer.alloc(end);
    this.bytes.copy(grown);
    this.bytes = grown;
  }
}

/** Awaits a rejection with an SshError of `code` and a one-line message; returns it. */
async function sshFailure(t: Test, p: Promise<unknown>, code: string): Promise<SshError> {
  const e: unknown = await p.then(() => null, (err: unknown) => err);
  if (!(e instanceof SshError)) {
    t.fail(`expected an SshError ${code}, got ${String(e)}`);
    throw e;
  }
  t.equal(e.code, code, e.message);
  t.notMatch(e.message, /\n/, 'the message is one line');
  return e;
}

/** `ssh-keygen -lf` of a public key file: the independent fingerprint oracle. */
async function keygenFingerprint(pubPath: string): Promise<string> {
  const { stdout } = await run('ssh-keygen', ['-lf', pubPath]);
  return stdout.split(/\s+/)[1]!;
}

t.test('random writes and reads match a local mirror; reads see writes without flush', async (t) => {
  const path = join(data, 'random.bin');
  const f = await conn.openFile(path, 'w');
  const bytes = prng(1);
  const r = rng(2);
  const mirror = new Mirror();
  let last = { at: 0, length: 0 };
  let reads = 0;
  for (let i = 0; i < 250; i++) {
    const op = r(100);
    const size = mirror.bytes.length;
    if (op < 55 || size === 0) {
      const kind = r(4);
      const length = 1 + (kind === 0 ? r(600) : kind === 1 ? r(600 * 1024) : r(64 * 1024)); // up to three requests of 252 KiB
      let at: number;
      switch (r(4)) {
        case 0: at = r(2048) * 4096; break; // aligned, up to 8 MiB
        case 1: at = r(8 * MiB); break; // anywhere
        case 2: at = Math.max(0, last.at + r(last.length + 1) - r(4096)); break; // overlapping the previous write
        default: at = size + r(MiB); // past the end: a hole, then data
      }
      const buf = bytes(length);
      mirror.write(buf, at);
      await f.write(buf, at);
      buf.fill(0xee); // write() has returned: the caller may reuse its buffer at once
      last = { at, length };
    } else if (op < 90) {
      const at = r(size);
      const length = 1 + r(Math.min(size - at, r(3) === 0 ? 900 * 1024 : 64 * 1024));
      const out = Buffer.alloc(length);
      await f.read(out, at);
      reads++;
      if (!out.equals(mirror.bytes.subarray(at, at + length))) {
        t.fail(`op ${i}: read of ${length} bytes at ${at} differs from the mirror`);
        break;
      }
    } else if (op < 95) {
      const at = Math.max(0, size - r(1000));
      await t.rejects(f.read(Buffer.alloc(1001 + r(1000)), at), RangeError, 'a read past the end throws');
    } else {
      t.equal(await f.size(), size, `size after op ${i}`);
    }
  }
  t.ok(reads > 70, `${reads} reads compared with the mirror`);

  // Call order, not await order: a read called right after an unawaited write sees it, and
  // of two unawaited overlapping writes the later one wins.
  const a = bytes(600 * 1024);
  const b = bytes(300 * 1024);
  const out = Buffer.alloc(a.length);
  mirror.write(a, 12345);
  mirror.write(b, 12345 + 1000);
  await Promise.all([f.write(a, 12345), f.write(b, 12345 + 1000), f.read(out, 12345)]);
  t.ok(out.equals(mirror.bytes.subarray(12345, 12345 + a.length)), 'a read called after unawaited writes returns their data');

  await f.flush();
  t.equal(await f.size(), mirror.bytes.length, 'size');
  t.ok(readFileSync(path).equals(mirror.bytes), 'the file on the server equals the mirror');
  await f.close();
  await t.rejects(f.read(Buffer.alloc(1), 0), UsageError, 'a closed file refuses reads');
});

t.test('truncate grows sparse and shrinks; size; read-only files refuse writes', async (t) => {
  const path = join(data, 'truncate.bin');
  const f = await conn.openFile(path, 'w');
  const head = prng(3)(MiB);
  await f.write(head, 0);
  await f.truncate(256 * MiB);
  t.equal(await f.size(), 256 * MiB, 'grown to 256 MiB');
  t.ok(statSync(path).blocks * 512 < 8 * MiB, `sparse: ${statSync(path).blocks * 512} bytes allocated`);
  const mid = Buffer.alloc(MiB, 1);
  await f.read(mid, 128 * MiB);
  t.ok(mid.equals(Buffer.alloc(MiB)), 'the grown part reads as zeros');
  await f.truncate(1000);
  t.equal(await f.size(), 1000, 'shrunk to 1000 bytes');
  await f.write(Buffer.from('tail'), 5000);
  await f.flush();
  const onDisk = readFileSync(path);
  t.equal(onDisk.length, 5004);
  t.ok(onDisk.subarray(0, 1000).equals(head.subarray(0, 1000)), 'the kept head is intact');
  t.ok(onDisk.subarray(1000, 5000).equals(Buffer.alloc(4000)), 'the hole after a shrink reads as zeros');
  await f.close();

  const ro = await conn.openFile(path, 'r');
  await t.rejects(ro.write(Buffer.alloc(1), 0), UsageError, 'opened read-only');
  t.equal(await ro.size(), 5004);
  await ro.close();
  await sshFailure(t, conn.openFile(join(data, 'missing.bin'), 'r'), 'SSH_IO');
});

t.test('flush: the data is in the file on the host before close; fsync missing is said once', async (t) => {
  const path = join(data, 'flush.bin');
  const f = await conn.openFile(path, 'w');
  const buf = prng(4)(3 * MiB + 17);
  await f.write(buf, 0);
  await f.flush();
  t.ok(readFileSync(path).equals(buf), 'after flush, without close, the host file holds the data');
  await f.close();

  // A server without fsync@openssh.com (not configurable in OpenSSH, so the announcement is
  // removed on our side): flush still drains the pipeline and warns once per connection.
  const warnings: string[] = [];
  const c = await SshConnection.connect({ ...sshd.connectOptions(), onWarning: (m) => warnings.push(m) });
  delete (c.sftp as unknown as { _extensions: Record<string, string> })._extensions['fsync@openssh.com'];
  for (const name of ['nofsync1.bin', 'nofsync2.bin']) {
    const g = await c.openFile(join(data, name), 'w');
    await g.write(buf, 0);
    await g.flush();
    t.ok(readFileSync(join(data, name)).equals(buf), `${name}: flush drained the writes`);
    await g.close();
  }
  t.equal(warnings.length, 1, 'warned once');
  t.match(warnings[0], /fsync@openssh\.com/);
  await c.close();
});

t.test('a write the host fails (full filesystem) surfaces at a later call, flush and close', async (t) => {
  const full = join(sshd.dir, 'full');
  mkdirSync(full);
  await run('mount', ['-t', 'tmpfs', '-o', 'size=4M', 'tmpfs', full]);
  t.teardown(() => run('umount', [full]));
  const f = await conn.openFile(join(full, 'big.bin'), 'w');
  const chunk = prng(8)(MiB);
  let failedAt = -1;
  let failure: unknown = null;
  for (let i = 0; i < 16 && failure === null; i++) {
    await f.write(chunk, i * MiB).catch((e: unknown) => {
      failure = e;
      failedAt = i;
    });
  }
  if (failure === null) failure = await f.flush().then(() => null, (e: unknown) => e);
  t.ok(failure instanceof SshError && failure.code === 'SSH_IO', `a later call failed: ${String(failure)}`);
  t.ok(failedAt === -1 || failedAt >= 4, `the failure surfaced at or after the write that filled the 4 MiB (call ${failedAt})`);
  t.match(String(failure), /write \d+ bytes at \d+ of .*big\.bin: Failure \(the host gives no reason/, 'names the lost write');
  await sshFailure(t, f.flush(), 'SSH_IO');
  await sshFailure(t, f.write(chunk, 0), 'SSH_IO');
  await sshFailure(t, f.close(), 'SSH_IO');
});

t.test('64 MiB sequential write through the pipeline', async (t) => {
  const path = join(data, 'stream.bin');
  const chunk = prng(5)(MiB);
  const expected = createHash('md5');
  const f = await conn.openFile(path, 'w');
  const start = process.hrtime.bigint();
  for (let i = 0; i < 64; i++) {
    chunk.writeUInt32LE(i, 0); // one buffer, reused: each write must have taken its copy
    expected.update(chunk);
    await f.write(chunk, i * MiB);
  }
  await f.flush();
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  await f.close();
  t.comment(`64 MiB written and fsynced in ${seconds.toFixed(2)} s: ${(64 * MiB / 1e6 / seconds).toFixed(0)} MB/s`);

  const back = await conn.openFile(path, 'r');
  const all = Buffer.alloc(64 * MiB);
  const readStart = process.hrtime.bigint();
  await back.read(all, 0);
  const readSeconds = Number(process.hrtime.bigint() - readStart) / 1e9;
  await back.close();
  t.comment(`64 MiB read in one call in ${readSeconds.toFixed(2)} s: ${(64 * MiB / 1e6 / readSeconds).toFixed(0)} MB/s`);
  const want = expected.digest('hex');
  t.equal(createHash('md5').update(readFileSync(path)).digest('hex'), want, 'the host file has every chunk');
  t.equal(createHash('md5').update(all).digest('hex'), want, 'reading it back gives the same bytes');

  // The same writer with one request in flight, for comparison (8 MiB).
  const serial = await conn.openFile(join(data, 'serial.bin'), 'w', { window: 1 });
  const s0 = process.hrtime.bigint();
  for (let i = 0; i < 8; i++) await serial.write(chunk, i * MiB);
  await serial.flush();
  const s1 = Number(process.hrtime.bigint() - s0) / 1e9;
  await serial.close();
  t.comment(`one request in flight: 8 MiB in ${s1.toFixed(2)} s: ${(8 * MiB / 1e6 / s1).toFixed(0)} MB/s`);
});

t.test('host key pinning', async (t) => {
  const hostPub = join(sshd.dir, 'host_ed25519.pub');
  const fp = await keygenFingerprint(hostPub);
  const name = `[127.0.0.1]:${sshd.port}`;
  const attempt = (knownHostsPath: string): Promise<SshConnection> =>
    SshConnection.connect({ ...sshd.connectOptions(), knownHostsPath, readyTimeoutMs: 10_000 });

  const empty = join(sshd.dir, 'kh-empty');
  writeFileSync(empty, '');
  let e = await sshFailure(t, attempt(empty), 'SSH_HOST_KEY');
  t.match(e.message, `unknown host key for 127.0.0.1:${sshd.port}: ssh-ed25519 ${fp}`, 'names the host, type and fingerprint');
  t.match(e.message, `ssh-keyscan -p ${sshd.port} -t ed25519 127.0.0.1 >> ${empty}`, 'says how to pin it');

  e = await sshFailure(t, attempt(join(sshd.dir, 'kh-missing')), 'SSH_HOST_KEY');
  t.match(e.message, /kh-missing does not exist/);

  // What the message suggests really pins the key.
  const { stdout } = await run('ssh-keyscan', ['-p', String(sshd.port), '-t', 'ed25519', '127.0.0.1']);
  const scanned = join(sshd.dir, 'kh-scanned');
  writeFileSync(scanned, stdout);
  await (await attempt(scanned)).close();
  t.pass('the ssh-keyscan line is accepted');

  const otherKey = join(sshd.dir, 'other_host');
  await sshKeygen(otherKey);
  const otherPub = readFileSync(`${otherKey}.pub`, 'utf8').split(' ').slice(0, 2).join(' ');
  const changed = join(sshd.dir, 'kh-changed');
  writeFileSync(changed, `# pinned before the reinstall\n${name} ${otherPub}\n`);
  e = await sshFailure(t, attempt(changed), 'SSH_HOST_KEY');
  t.match(e.message, `host key of 127.0.0.1:${sshd.port} CHANGED: it offers ssh-ed25519 ${fp} but ${changed} line 2 pins ${await keygenFingerprint(`${otherKey}.pub`)}`);

  const pinnedForOtherPort = join(sshd.dir, 'kh-port22');
  writeFileSync(pinnedForOtherPort, `127.0.0.1 ${sshd.hostPublicKey}\n`);
  await sshFailure(t, attempt(pinnedForOtherPort), 'SSH_HOST_KEY');

  const hashed = join(sshd.dir, 'kh-hashed');
  writeFileSync(hashed, `example.org ${otherPub}\n${name} ${sshd.hostPublicKey}\n`);
  await run('ssh-keygen', ['-H', '-f', hashed]);
  t.match(readFileSync(hashed, 'utf8'), /^\|1\|/, 'ssh-keygen -H hashed the names');
  await (await attempt(hashed)).close();
  t.pass('a hashed entry is accepted');

  const wildcard = join(sshd.dir, 'kh-wildcard');
  writeFileSync(wildcard, `!example.org,[127.0.0.?]:${sshd.port} ${sshd.hostPublicKey}\n`);
  await (await attempt(wildcard)).close();
  t.pass('a wildcard pattern is accepted');

  // A host with two host keys: whichever one is pinned is the one asked for.
  const twoKeys = await startSshd({ extraHostKeyTypes: ['ecdsa'] });
  t.teardown(() => twoKeys.stop());
  const ecdsa = twoKeys.hostKeys.find((k) => k.type === 'ecdsa-sha2-nistp256')!;
  for (const key of twoKeys.hostKeys) {
    const only = join(twoKeys.dir, `kh-only-${key.type}`);
    writeFileSync(only, `[127.0.0.1]:${twoKeys.port} ${key.publicKey}\n`);
    await (await SshConnection.connect({ ...twoKeys.connectOptions(), knownHostsPath: only })).close();
    t.pass(`pinning only its ${key.type} key is enough`);
  }
  const none = join(twoKeys.dir, 'kh-empty');
  writeFileSync(none, '');
  e = await sshFailure(t, SshConnection.connect({ ...twoKeys.connectOptions(), knownHostsPath: none }), 'SSH_HOST_KEY');
  t.match(e.message, 'ssh-ed25519', 'unpinned, it shows the preferred ed25519 key');
  t.notMatch(e.message, ecdsa.type);

  const revoked = join(sshd.dir, 'kh-revoked');
  writeFileSync(revoked, `${name} ${sshd.hostPublicKey}\n@revoked * ${sshd.hostPublicKey}\n`);
  e = await sshFailure(t, attempt(revoked), 'SSH_HOST_KEY');
  t.match(e.message, /marked @revoked/);
});

t.test('a refused user key, a closed port, a silent server: one clear line each', async (t) => {
  const stranger = join(sshd.dir, 'stranger');
  await sshKeygen(stranger);
  const e = await sshFailure(t, SshConnection.connect({ ...sshd.connectOptions(), privateKey: stranger }), 'SSH_AUTH');
  t.match(e.message, `${sshd.username}@127.0.0.1:${sshd.port} refused key authentication with ${stranger} (ssh-ed25519 ${await keygenFingerprint(`${stranger}.pub`)})`);

  await sshFailure(t, SshConnection.connect({ ...sshd.connectOptions(), privateKey: join(sshd.dir, 'no-such-key') }), 'SSH_KEY');

  const closed = createServer();
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
  const port = (closed.address() as { port: number }).port;
  await new Promise<void>((resolve) => closed.close(() => resolve()));
  const refused = await sshFailure(t, SshConnection.connect({ ...sshd.connectOptions(), port }), 'SSH_CONNECT');
  t.match(refused.message, `cannot connect to 127.0.0.1:${port}: connection refused`);

  const held: Socket[] = [];
  const silent = createServer((s) => held.push(s)); // accepts and never says a word
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const silentPort = (silent.address() as { port: number }).port;
  const t0 = Date.now();
  const timedOut = await sshFailure(t, SshConnection.connect({ ...sshd.connectOptions(), port: silentPort, readyTimeoutMs: 1000 }), 'SSH_TIMEOUT');
  t.ok(Date.now() - t0 < 5000, `gave up after ${Date.now() - t0} ms`);
  t.match(timedOut.message, `127.0.0.1:${silentPort}`);
  for (const s of held) s.destroy();
  silent.close();
});

t.test('a server killed mid-stream fails the writer without hanging', { timeout: 30_000 }, async (t) => {
  const doomed = await startSshd();
  t.teardown(() => doomed.stop());
  const c = await SshConnection.connect({ ...doomed.connectOptions(), keepaliveIntervalMs: 1000 });
  const f = await c.openFile(join(doomed.dir, 'victim.bin'), 'w');
  const chunk = prng(6)(MiB);
  let failure: unknown = null;
  let i = 0;
  for (; i < 4096 && failure === null; i++) {
    if (i === 16) doomed.kill();
    try {
      await f.write(chunk, i * MiB);
    } catch (e) {
      failure = e;
    }
  }
  t.ok(failure instanceof SshError, `write ${i - 1} failed: ${String(failure)}`);
  t.ok(i - 1 >= 16, 'only after the kill');
  t.equal((failure as SshError).code, 'SSH_CLOSED');
  await sshFailure(t, f.flush(), 'SSH_CLOSED');
  await sshFailure(t, f.close(), 'SSH_CLOSED');
  await sshFailure(t, c.exec('true'), 'SSH_CLOSED');
  await sshFailure(t, c.openFile(join(doomed.dir, 'x'), 'w'), 'SSH_CLOSED');
  await c.close();
});

t.test('a frozen server (SIGSTOP) is declared dead by keepalives; the writer fails', { timeout: 30_000 }, async (t) => {
  const frozen = await startSshd();
  t.teardown(() => frozen.stop());
  const c = await SshConnection.connect({ ...frozen.connectOptions(), keepaliveIntervalMs: 500 });
  const f = await c.openFile(join(frozen.dir, 'victim.bin'), 'w');
  const chunk = prng(7)(MiB);
  await f.write(chunk, 0);
  await f.flush();
  frozen.freeze();
  const t0 = Date.now();
  let failure: unknown = null;
  for (let i = 1; i < 4096 && failure === null; i++) {
    await f.write(chunk, i * MiB).catch((e: unknown) => (failure = e));
  }
  t.ok(failure instanceof SshError && failure.code === 'SSH_CLOSED', `failed with ${String(failure)}`);
  t.ok(Date.now() - t0 < 10_000, `after ${Date.now() - t0} ms (3 keepalives of 500 ms unanswered)`);
  await sshFailure(t, f.close(), 'SSH_CLOSED');
  await c.close();
});

t.test('opener reaches siblings; stat, exists, unlink; rename over an existing file is atomic', async (t) => {
  const vm = join(data, 'vm');
  mkdirSync(vm);
  writeFileSync(join(vm, 'disk-flat.vmdk'), 'flat extent bytes');
  const open = sftpOpener(conn, vm);
  const flat = await open('disk-flat.vmdk', 'r');
  const got = Buffer.alloc(17);
  await flat.read(got, 0);
  t.equal(got.toString(), 'flat extent bytes', 'a relative name opens the sibling');
  t.equal(flat.path, join(vm, 'disk-flat.vmdk'));
  await flat.close();
  const created = await open('new.vmdk', 'wx');
  await created.write(Buffer.from('new'), 0);
  await created.close();
  t.equal(readFileSync(join(vm, 'new.vmdk'), 'utf8'), 'new', "'wx' creates");
  const exists = await sshFailure(t, open('new.vmdk', 'wx'), 'SSH_IO');
  t.match(exists.message, /exist already/);
  const abs = await open(join(data, 'flush.bin'), 'r');
  t.equal(await abs.size(), 3 * MiB + 17, 'an absolute name is taken as given');
  await abs.close();

  t.equal((await remoteStat(conn, join(vm, 'new.vmdk')))?.size, 3);
  t.equal(await remoteStat(conn, join(vm, 'nothing')), null);
  t.equal(await remoteExists(conn, join(vm, 'disk-flat.vmdk')), true);
  t.equal(await remoteExists(conn, join(vm, 'nothing')), false);

  const target = join(vm, 'disk.vmdk');
  const temp = join(vm, 'disk.vmdk.tmp');
  writeFileSync(target, 'old descriptor');
  writeFileSync(temp, 'new descriptor');
  const tempInode = statSync(temp).ino;
  await remoteRename(conn, temp, target);
  t.equal(readFileSync(target, 'utf8'), 'new descriptor', 'the target has the new content');
  t.equal(statSync(target).ino, tempInode, 'same inode: one rename(2), not a copy');
  t.notOk(existsSync(temp), 'the temporary name is gone');

  await remoteUnlink(conn, target);
  t.notOk(existsSync(target));
  await remoteUnlink(conn, target, { missingOk: true });
  const missing = await remoteUnlink(conn, target).then(() => null, (e: unknown) => e);
  t.ok(isNoSuchFile(missing), 'unlinking a missing file says no such file');
});

t.test('exec returns exit code and output', async (t) => {
  t.same(await conn.exec('printf out; printf err >&2; exit 3'), { code: 3, stdout: 'out', stderr: 'err' });
  t.same(await conn.exec('tr a-z A-Z', { input: 'virsh define\n' }), { code: 0, stdout: 'VIRSH DEFINE\n', stderr: '' });
  const killed = await conn.exec('kill -TERM $$');
  t.equal(killed.code, null);
  t.equal(killed.signal, 'SIGTERM');
});

t.test('ssh:// targets', async (t) => {
  t.same(parseSshTarget('ssh://root@esx1.lab/vmfs/volumes/ds1/vm'), { username: 'root', host: 'esx1.lab', port: 22, path: '/vmfs/volumes/ds1/vm' });
  t.same(parseSshTarget('ssh://backup@10.0.0.5:2222/srv/standby/disk.vhdx'), { username: 'backup', host: '10.0.0.5', port: 2222, path: '/srv/standby/disk.vhdx' });
  t.same(parseSshTarget('ssh://u@[::1]:2200/x'), { username: 'u', host: '::1', port: 2200, path: '/x' });
  t.same(parseSshTarget('ssh://u@[fe80::1]/x'), { username: 'u', host: 'fe80::1', port: 22, path: '/x' });
  t.same(parseSshTarget('SSH://LAB%5Cadmin@hv1/C:/Hyper-V/My%20Disks/d.vhdx'),
    { username: 'LAB\\admin', host: 'hv1', port: 22, path: '/C:/Hyper-V/My Disks/d.vhdx' });
  t.equal(formatSshTarget(parseSshTarget('ssh://u@[::1]:22/a%20b')), 'ssh://u@[::1]/a%20b');
  t.equal(formatSshTarget({ username: 'u', host: 'h', port: 2222, path: '/p' }), 'ssh://u@h:2222/p');

  const bad: [string, RegExp][] = [
    ['/local/path', /does not start with ssh:\/\//],
    ['ssh://host/path', /no user/],
    ['ssh://@host/path', /user is empty/],
    ['ssh://u:secret@host/path', /passwords are not accepted/],
    ['ssh://u@host', /no path/],
    ['ssh://u@/path', /host is empty/],
    ['ssh://u@host:/path', /port "" is not a number/],
    ['ssh://u@host:99999/path', /port 99999 is outside/],
    ['ssh://u@host:0/path', /port 0 is outside/],
    ['ssh://u@host:22x/path', /port "22x"/],
    ['ssh://u@::1/path', /IPv6 address must be written in brackets/],
    ['ssh://u@[::1/path', /not closed/],
    ['ssh://u@[nothost]/path', /not an IPv6 address/],
    ['ssh://u@[::1]x/path', /unexpected "x"/],
    ['ssh://u@ho st/path', /not a host name/],
    ['ssh://u@host/p?x=1', /"\?" and "#"/],
    ['ssh://u@host/bad%zz', /malformed percent escape/],
    ['ssh://u@host/a%0Ab', /control character/],
  ];
  for (const [text, why] of bad) {
    t.throws(() => parseSshTarget(text), { name: 'UsageError', message: why }, text);
  }
});
