/**
 * `imagekeep mount`, `umount`, `mounts` and `test-restore`. A background mount re-runs this
 * same command line in a detached child with the hidden --server flag (serve in the
 * foreground, leave nested mounts and the record to the parent), so the server process is
 * never the one that reads its own mount.
 */
import { stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { KeyRing } from '../chain/image/reader.js';
import { folderTimeZone } from '../chain/config.js';
import { parseLocalTime } from '../chain/policy/calendar.js';
import { ImagekeepError, UsageError } from '../formats/errors.js';
import { listMounts, mountBackground, pickImage, serveImage, unmount } from '../mount/mount.js';
import { newOverlayPath } from '../mount/state.js';
import { testRestore } from '../mount/test-restore.js';
import { readPassword, table } from './output.js';

class TestRestoreFailedError extends ImagekeepError {
  constructor(message: string) {
    super('TEST_RESTORE_FAILED', message);
  }
}

/** The command line that serves `image` on `dir` in the foreground, for a detached child. */
function serverCommand(image: string, dir: string, files: boolean, passwordFile: string | undefined, overlay?: string): string[] {
  return [
    process.execPath, resolve(process.argv[1]!), 'mount', resolve(image), resolve(dir), '--foreground', '--server',
    ...(files ? ['--files'] : []), ...(passwordFile ? ['--password-file', resolve(passwordFile)] : []),
    ...(overlay ? ['--writable', '--overlay-file', overlay] : []),
  ];
}

async function imageOf(target: string, at: string | undefined, volume: string | undefined): Promise<string> {
  const st = await stat(target).catch(() => null);
  if (!st) throw new UsageError(`${target} does not exist`);
  if (st.isDirectory()) {
    if (!at) throw new UsageError(`${target} is a folder: say which point with --at TIME (the newest at or before it is mounted)`);
    return pickImage(target, parseLocalTime(at, await folderTimeZone(target), '--at'), volume);
  }
  if (at || volume) throw new UsageError('--at and --volume pick a point of a folder; give the folder, not an image');
  return target;
}

function stamp(line: string): void {
  process.stderr.write(`${new Date().toISOString()} ${line}\n`);
}

export function addMountCommands(program: Command, interrupt: AbortController): void {
  program.command('mount')
    .summary('mount a point in time through FUSE (read-only, or --writable with a discarded overlay): disk.raw, partitions/pN.raw, files/pN/')
    .description('Mount the point in time of an image (or of a folder at a time) read-only through FUSE, after checking ' +
      'the headers, indexes and point-id links of its whole dependency path. The mount shows disk.raw and ' +
      'partitions/pN.raw (MBR primaries p1-p4, logicals from p5; GPT in table order), or volume.raw for a volume image; ' +
      'with --files each NTFS (ntfs-3g), ext2/3/4 (fuse2fs) and FAT12/16/32 (fusefat) volume is mounted read-only on ' +
      'files/pN/ (files/volume/ for a volume image). With --writable, writes go to a copy-on-write overlay in a sparse ' +
      'temporary file (--overlay-dir), discarded at umount; the chain is never written, and with --files NTFS and ext ' +
      'volumes are mounted read-write (FAT stays read-only). A write past the end of a file fails with ENOSPC. Runs in the ' +
      'background and returns once mounted (--foreground stays attached until Ctrl-C or umount). A block that fails its ' +
      'checksum reads as an I/O error (EIO), never as wrong bytes, and is logged with image and block. Mounts are ' +
      'recorded in $IMAGEKEEP_RUN_DIR (default /run/imagekeep), with the server\'s log.')
    .argument('<image>', 'an image file (.spf/.spi), or a backup folder with --at')
    .argument('<dir>', 'an existing empty directory')
    .option('--at <time>', 'with a folder: mount the newest point captured at or before TIME (ISO-8601; the folder\'s time zone without an offset)')
    .option('--volume <name>', 'with a folder holding several volumes: which one')
    .option('--files', 'also mount each NTFS, ext and FAT volume on files/pN/ (read-only unless --writable; FAT always read-only)')
    .option('--writable', 'accept writes into a copy-on-write overlay discarded at umount; the chain is never written')
    .option('--overlay-dir <dir>', 'with --writable: where the overlay file goes (default $TMPDIR or /tmp); it grows by what is written')
    .addOption(new Option('--overlay-file <file>').hideHelp())
    .option('--foreground', 'serve from this process until interrupted or unmounted')
    .addOption(new Option('--server').hideHelp())
    .option('--password-file <file>', 'password of an encrypted chain (or IMAGEKEEP_PASSWORD_FILE)')
    .option('--json', 'print the result as JSON')
    .action(async (target: string, dir: string, o) => {
      const image = await imageOf(target, o.at, o.volume);
      const keyring = new KeyRing(await readPassword(o.passwordFile));
      if (o.overlayDir && !o.writable) throw new UsageError('--overlay-dir goes with --writable');
      const overlay = o.writable ? (o.overlayFile as string | undefined) ?? newOverlayPath(resolve(dir), resolve(o.overlayDir ?? tmpdir())) : undefined;
      if (o.foreground) {
        await serveImage({ image, dir, keyring, files: !!o.files, overlay, owner: !o.server, log: stamp, signal: interrupt.signal });
        // fuse-native's thread keeps the event loop alive after the unmount.
        process.exit(0);
      }
      const r = await mountBackground({ image, dir, keyring, files: !!o.files, overlay, command: serverCommand(image, dir, !!o.files, o.passwordFile, overlay) });
      if (o.json) {
        console.log(JSON.stringify({ ...r, view: { kind: r.view.kind, scheme: r.view.scheme, files: r.view.files, volumes: r.view.volumes.map((v) => ({ name: v.name, fs: v.fs, version: v.version, offset: v.file.offset, length: v.file.length })) } }, null, 2));
      } else {
        const vols = r.view.volumes.map((v) => `${v.name} (${v.version ?? v.fs})`).join(', ');
        console.log(`${r.dir}: ${r.image} (point of ${r.pointTime}) mounted ${r.overlay ? `writable (overlay ${r.overlay}, discarded at umount)` : 'read-only'} by pid ${r.pid}; ` +
          `${r.view.kind === 'volume' ? `volume.raw (${r.view.volumes[0]?.version ?? r.view.volumes[0]?.fs})` : `disk.raw${vols ? `, partitions ${vols}` : ''}`}` +
          `${r.nested.length ? `; files: ${r.nested.map((n) => n.slice(r.dir.length + 1)).join(', ')}` : ''}; log ${r.log}`);
      }
      for (const f of r.failed) process.stderr.write(`imagekeep: warning: files/${f.name} not mounted: ${f.error}\n`);
      for (const w of r.warnings) process.stderr.write(`imagekeep: warning: ${w}\n`);
    });

  program.command('umount')
    .summary('unmount a mount made by imagekeep mount (nested mounts first)')
    .description('Unmount a point mounted by imagekeep mount: the nested files/ mounts first, then the point; a mount ' +
      'whose server died is detached lazily, so nothing stays stuck. A --writable mount\'s overlay file is removed.')
    .argument('<dir>')
    .option('--json', 'print the result as JSON')
    .action(async (dir: string, o) => {
      const r = await unmount(dir);
      if (o.json) console.log(JSON.stringify(r, null, 2));
      else console.log(`${r.dir}: unmounted (${r.unmounted.length} mount${r.unmounted.length === 1 ? '' : 's'})`);
    });

  program.command('mounts')
    .summary('list the points mounted by imagekeep mount')
    .option('--json', 'print as JSON')
    .action(async (o) => {
      const list = await listMounts();
      if (o.json) { console.log(JSON.stringify(list, null, 2)); return; }
      if (list.length === 0) { console.log('nothing mounted'); return; }
      console.log(table([['DIR', 'STATE', 'MODE', 'PID', 'POINT', 'IMAGE', 'FILES'],
        ...list.map((m) => [m.dir, m.state, m.overlay ? 'rw' : 'ro', String(m.pid), m.pointTime, m.image, m.nested.map((n) => n.slice(m.dir.length + 1)).join(',') || '-'])]));
    });

  program.command('test-restore')
    .summary('mount a point, check every volume (e2fsck, ntfsfix, fsck.vfat; then read every file), report')
    .description('Prove a point can be restored: mount it, check each volume (ext: e2fsck -fn, then mount and read every ' +
      'file; NTFS: ntfsfix -n, then an ntfs-3g mount reading every file; FAT: fsck.vfat -n, then a fusefat mount reading ' +
      'every file), unmount, and report per ' +
      'volume. Exit status 1 when any volume fails.')
    .argument('<image>')
    .option('--password-file <file>', 'password of an encrypted chain (or IMAGEKEEP_PASSWORD_FILE)')
    .option('--json', 'print the report as JSON')
    .action(async (image: string, o) => {
      const keyring = new KeyRing(await readPassword(o.passwordFile));
      const r = await testRestore(image, keyring, (img, dir) => serverCommand(img, dir, true, o.passwordFile));
      if (o.json) console.log(JSON.stringify(r, null, 2));
      else {
        for (const v of r.volumes) {
          console.log(`${v.ok ? 'OK    ' : 'FAILED'}  ${v.name} (${v.fs}, ${v.length} bytes at ${v.offset})`);
          for (const c of v.checks) console.log(`          ${c.ok ? 'ok  ' : 'FAIL'} ${c.tool}: ${c.detail}`);
        }
        console.log(`${r.volumes.length} volumes checked in ${r.seconds.toFixed(1)} s, ${r.volumes.filter((v) => !v.ok).length} failed`);
      }
      const bad = r.volumes.filter((v) => !v.ok);
      if (bad.length > 0) {
        throw new TestRestoreFailedError(`test-restore of ${r.image} failed: ${bad.map((v) => `volume ${v.name} (${v.fs}): ${v.checks.filter((c) => !c.ok).map((c) => `${c.tool} ${c.detail}`).join('; ')}`).join('; ')}`);
      }
    });
}
