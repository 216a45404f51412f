/**
 * The `imagekeep` command: parses arguments (commander), calls the library, prints results
 * (text, or JSON with --json) and turns errors into one line and an exit code.
 */
import { Command, Option } from 'commander';
import { backup } from '../chain/backup.js';
import { describeFolder } from '../chain/describe.js';
import { restore } from '../chain/export.js';
import { exportDisk } from '../chain/export-disk.js';
import { formats } from '../formats/drivers.js';
import { KeyRing } from '../chain/image/reader.js';
import { openPoint, resolvePath } from '../chain/open.js';
import { readSidecar } from '../chain/sidecar.js';
import { verify } from '../chain/verify-folder.js';
import { addProcessCommand } from './process-command.js';
import { addMountCommands } from './mount-command.js';
import { addHeadstartCommands } from './headstart-command.js';
import { folderTimeZone } from '../chain/config.js';
import { parseLocalTime } from '../chain/policy/calendar.js';
import { UsageError } from '../formats/errors.js';

import { InterruptedError, describeError } from './errors.js';
import { humanBytes, parseSize, progressBar, readPassword, table, warnLine } from './output.js';

// Output piped into a reader that stops early (`imagekeep ls | head`) is not an error.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw e;
});

// Ctrl-C or SIGTERM aborts long work cleanly: temporary files removed, the folder unlocked.
const interrupt = new AbortController();
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => interrupt.abort(new InterruptedError(`interrupted by ${sig}; nothing was written under a final name`)));
}

const program = new Command('imagekeep')
  .description('Block-level image backups: an open image format, chains of incrementals, and any point in time read back.')
  .version('0.1.0')
  .addHelpText('after', '\nErrors are one line on stderr; the exit status is 1 for a failure and 2 for a usage error.\n' +
    'Passwords are read from --password-file or IMAGEKEEP_PASSWORD_FILE, never from the command line.\n' +
    'Run "imagekeep help <command>" for a command\'s options.')
  // Usage errors, like every error, are one line: "imagekeep: what is wrong; what to do".
  .exitOverride() // before the subcommands, which inherit it
  .configureOutput({ outputError: (str, write) => write(`imagekeep: ${str.trim().replace(/^error: /, '')}; see imagekeep --help\n`) });

program.command('backup')
  .summary('take a full or incremental image of a disk or disk image file')
  .description('Take a full or incremental image of a disk image file or block device into a backup folder. ' +
    'The first backup of a volume (or --full) starts a new chain (base .spf); later ones add incrementals (.spi) ' +
    'holding only the blocks that changed. By default free space of NTFS and ext2/3/4 volumes is recorded as zero ' +
    '(active-sector mode); --forensic keeps every non-zero block so a restore is byte-identical.')
  .argument('<source>', 'block device, or disk image file: raw, VHD, VHDX, VMDK or qcow2 (probed)')
  .argument('<folder>', 'backup folder (created when missing)')
  .addOption(new Option('--source-format <format>', 'format of <source> when probing should not decide').choices(formats.formats))
  .option('--volume <name>', 'volume name used in file names (default: the folder\'s only volume, else C_VOL)')
  .option('--full', 'start a new chain with a full base image')
  .option('--at <time>', 'capture time to record (ISO-8601; without an offset, in the folder\'s time zone; must be after the previous point); also the file mtime')
  .option('--forensic', 'store every non-zero block, free space included')
  .option('--block-size <bytes>', 'block size of a new chain (power of two, 4K..4M)', '65536')
  .addOption(new Option('--compress <method>', 'block compression').choices(['zstd', 'none']).default('zstd'))
  .option('--compress-level <n>', 'zstd level', '1')
  .option('--password-file <file>', 'encrypt a new chain / open an encrypted one with the password in FILE (or IMAGEKEEP_PASSWORD_FILE)')
  .option('--changed-blocks <file>', 'read only these byte ranges ("OFFSET LENGTH" per line) for an incremental')
  .option('--pre <command>', 'shell command to run before reading (e.g. fsfreeze -f)')
  .option('--post <command>', 'shell command to run after reading, also when the backup fails')
  .option('--json', 'print the result as JSON')
  .action(async (source: string, folder: string, o) => {
    const bar = o.json ? null : progressBar('backup');
    const r = await backup(source, folder, {
      sourceFormat: o.sourceFormat, volume: o.volume, full: !!o.full, at: o.at ? parseLocalTime(o.at, await folderTimeZone(folder), '--at') : undefined, forensic: !!o.forensic,
      blockSize: parseSize(o.blockSize, '--block-size'), compression: o.compress, compressionLevel: Number(o.compressLevel),
      password: await readPassword(o.passwordFile), changedBlocksFile: o.changedBlocks, pre: o.pre, post: o.post,
      onWarning: warnLine, onProgress: bar?.update, signal: interrupt.signal,
    }).finally(() => bar?.stop());
    if (o.json) console.log(JSON.stringify(r, null, 2));
    else {
      console.log(`${r.image}: ${r.kind} of ${humanBytes(r.sourceBytes)}, ${r.dataBlocks} blocks stored, ${r.zeroBlocks} recorded as zero, ` +
        `${humanBytes(r.imageBytes)} written in ${r.seconds.toFixed(1)} s (${humanBytes(r.bytesRead / Math.max(r.seconds, 0.001))}/s read)`);
    }
  });

program.command('ls')
  .summary('list the chains and images of a backup folder')
  .description('List the chains of a backup folder: each file with its level, range, point time, size and .md5 state.')
  .argument('<folder>')
  .option('--json', 'print as JSON')
  .action(async (folder: string, o) => {
    const d = await describeFolder(folder);
    if (o.json) { console.log(JSON.stringify(d, null, 2)); return; }
    if (d.chains.length === 0) console.log(`${d.folder}: no images`);
    for (const c of d.chains) {
      console.log(`${c.volume}-b${String(c.base).padStart(3, '0')}  ${c.sourceKind}, ${humanBytes(c.virtualSize)}, blocks of ${humanBytes(c.blockSize)}, ` +
        `${c.compression}${c.encrypted ? ', encrypted' : ''}${c.forensic ? ', forensic' : ''}; newest ${c.newest ?? '-'}`);
      const rows = [['FILE', 'LEVEL', 'POINTS', 'TIME', 'SIZE', 'MD5', 'PATH']];
      for (const f of c.files) {
        rows.push([f.name, f.level, f.first === f.last ? String(f.last) : `${f.first}-${f.last}`, f.pointTime.replace('.000Z', 'Z'), humanBytes(f.bytes), f.md5, f.onNewestPath ? '*' : '']);
      }
      console.log(table(rows).split('\n').map((l) => '  ' + l).join('\n'));
      for (const p of c.problems) console.log(`  ! ${p.name}: ${p.error}`);
    }
    for (const s of d.strays) console.log(`! ${s}: named like an image but not an imagekeep name; ignored`);
  });

program.command('qp')
  .summary('print the files an image needs (its dependency path), newest first')
  .description('Print the dependency path of an image: the files needed to read its point in time, newest first.')
  .argument('<image>')
  .option('--json', 'print paths, ranges, levels and times as JSON')
  .action(async (image: string, o) => {
    const { path } = await resolvePath(image);
    if (o.json) {
      console.log(JSON.stringify(path.map((f) => ({
        name: f.name, path: f.path, first: f.first, last: f.last, levelBits: f.levelBits,
        pointTime: new Date(f.header.pointTime).toISOString(), endPointId: f.header.endPointId.toString('hex'),
      })), null, 2));
    } else for (const f of path) console.log(f.name);
  });

program.command('verify')
  .summary('check images against their .md5 (quick) or block by block (--deep)')
  .description('Verify every image of a folder, or the whole dependency path of one image. Quick compares each file ' +
    'with its .md5 sidecar; --deep also checks the header, index and every block against its checksum, which catches ' +
    'damage even when the .md5 was regenerated. Failures are listed in <volume>-<base>.bad.log (removed once the files ' +
    'verify good again), and backup refuses to extend a chain through a listed file. Exit status 1 when anything fails.')
  .argument('<target>', 'a backup folder or an image file')
  .option('--deep', 'check every block, not only the MD5')
  .option('--repair', 'with --deep: re-create a missing .md5 for an image whose every block checks out')
  .option('--password-file <file>', 'password of an encrypted chain (or IMAGEKEEP_PASSWORD_FILE); needed by --deep')
  .option('--json', 'print the report as JSON')
  .action(async (target: string, o) => {
    if (o.repair && !o.deep) throw new UsageError('--repair needs --deep: a .md5 is re-created only after every block checked out');
    const keyring = new KeyRing(await readPassword(o.passwordFile));
    const report = await verify(target, {
      deep: !!o.deep, repair: !!o.repair, keyring,
      onFile: o.json ? undefined : (c) => console.log(`${c.ok ? (c.repaired ? 'REPAIRED' : 'OK') : 'FAILED'}  ${c.name}${c.reason ? `: ${c.reason}` : ''}`),
    });
    if (o.json) console.log(JSON.stringify(report, null, 2));
    const failed = report.checked.filter((c) => !c.ok).length;
    if (!o.json) console.log(`${report.checked.length} checked (${o.deep ? 'deep' : 'quick'}), ${failed} failed`);
    if (failed > 0) process.exitCode = 1;
  });

addProcessCommand(program);
addMountCommands(program, interrupt);
addHeadstartCommands(program, interrupt);

async function pointFor(image: string, passwordFile: string | undefined) {
  const keyring = new KeyRing(await readPassword(passwordFile));
  const { point, path } = await openPoint(image, keyring);
  for (const f of path) {
    if ((await readSidecar(f.path, f.name)) === null) warnLine(`${f.name} has no .md5 sidecar; reading it anyway (every block is checked against its own checksum)`);
  }
  return point;
}

program.command('export')
  .summary('write the point in time of an image to a new virtual disk (raw, VHD, VHDX, VMDK, qcow2)')
  .description('Write the point in time of an image to a new disk file: sparse raw, VHD (fixed or dynamic), VHDX (dynamic), ' +
    'VMDK (monolithicSparse, streamOptimized for OVF/vSphere uploads, monolithicFlat, or vmfs: descriptor + -flat.vmdk as an ' +
    'ESXi datastore keeps disks) or qcow2 (v3). Files are written under temporary names and renamed when complete.')
  .argument('<image>')
  .argument('<out>')
  .addOption(new Option('--format <format>', 'output format').choices(formats.formats).default('raw'))
  .option('--subformat <name>', 'vhd: dynamic|fixed; vmdk: monolithicSparse|streamOptimized|monolithicFlat|vmfs')
  .option('--block-size <bytes>', 'the format\'s block size (VHD/VHDX block, VMDK grain, qcow2 cluster); its default otherwise')
  .option('--azure', 'VHD for Azure: fixed, size a whole number of MiB (refused otherwise)')
  .option('--force', 'replace <out> when it exists')
  .option('--password-file <file>', 'password of an encrypted chain (or IMAGEKEEP_PASSWORD_FILE)')
  .option('--json', 'print the result as JSON')
  .action(async (image: string, out: string, o) => {
    if (o.azure && o.format !== 'vhd') throw new UsageError('--azure applies to --format vhd only');
    const point = await pointFor(image, o.passwordFile);
    const bar = o.json ? null : progressBar('export');
    try {
      const r = await exportDisk(point, out, formats, {
        format: o.format, subformat: o.azure ? 'fixed' : o.subformat, azure: !!o.azure, force: !!o.force,
        blockSize: o.blockSize ? parseSize(o.blockSize, '--block-size') : undefined, onProgress: bar?.update, signal: interrupt.signal,
      });
      bar?.stop();
      if (o.json) console.log(JSON.stringify(r, null, 2));
      else console.log(`${r.files.join(' + ')}: ${r.format === r.subformat ? r.format : `${r.format} ${r.subformat}`}, ${humanBytes(r.bytes)} (${humanBytes(r.dataBytes)} of data) in ${r.seconds.toFixed(1)} s`);
    } finally {
      bar?.stop();
      await point.close();
    }
  });

program.command('restore')
  .summary('write the point in time of an image onto a device or file')
  .description('Write the point in time of an image onto a block device or disk image file. Refuses a target ' +
    'that is mounted (or served by a FUSE filesystem) or smaller than the point.')
  .argument('<image>')
  .argument('<target>', 'block device or file (a new file is created sparse)')
  .option('--password-file <file>', 'password of an encrypted chain (or IMAGEKEEP_PASSWORD_FILE)')
  .option('--json', 'print the result as JSON')
  .action(async (image: string, target: string, o) => {
    const point = await pointFor(image, o.passwordFile);
    const bar = o.json ? null : progressBar('restore');
    try {
      const r = await restore(point, target, { onProgress: bar?.update, signal: interrupt.signal });
      bar?.stop();
      if (o.json) console.log(JSON.stringify(r, null, 2));
      else console.log(`${target}: restored ${humanBytes(r.bytes)} in ${r.seconds.toFixed(1)} s`);
    } finally {
      bar?.stop();
      await point.close();
    }
  });

try {
  await program.parseAsync(process.argv);
} catch (e) {
  const ce = e as { code?: string; exitCode?: number };
  if (typeof ce.code === 'string' && ce.code.startsWith('commander.')) {
    process.exitCode = ce.code === 'commander.helpDisplayed' || ce.code === 'commander.version' || ce.code === 'commander.help' ? 0 : 2;
  } else {
    if (process.env.IMAGEKEEP_DEBUG) console.error(e);
    const { line, code } = describeError(e);
    process.stderr.write(`imagekeep: ${line}\n`);
    process.exitCode = e instanceof InterruptedError ? 130 : code;
  }
}
