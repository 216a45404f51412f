/**
 * A HeadStart job file: one standby disk kept close behind one volume of a backup folder.
 * Written by `headstart init`, read by every other `headstart` command. JSON, validated
 * with zod so a mistyped key or value is named with its path in one line.
 *
 *   { "version": 1,
 *     "source": "/backups/server1", "volume": "C_VOL",
 *     "target": "ssh://root@hv1.example/vmfs/volumes/ds1/server1",
 *     "disk": "server1.vmdk", "format": "vmdk", "subformat": "vmfs",
 *     "hypervisor": "esx",
 *     "vm": { "name": "server1-standby", "cpus": 2, "memoryMiB": 4096, "firmware": "bios", "network": "VM Network" },
 *     "lag": "newest",
 *     "bandwidthMBps": 100,
 *     "ssh": { "identity": "/root/.ssh/id_ed25519", "knownHosts": "/root/.ssh/known_hosts" } }
 *
 * lag: "newest" (the newest verified point), "daily" (only points that end a daily or
 * longer consolidated file), or "<N>h" (the newest point at least N hours old).
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../chain/durable.js';
import { UsageError } from '../formats/errors.js';
import { isSshUrl, parseSshTarget, type SshTarget } from '../formats/ssh/target.js';

export const DISK_FORMATS = ['vhdx', 'vhd', 'vmdk', 'qcow2', 'raw'] as const;
export const HYPERVISORS = ['hyperv', 'esx', 'libvirt', 'none'] as const;

const lagSchema = z.union([z.literal('newest'), z.literal('daily'), z.string().regex(/^[1-9][0-9]*h$/, 'lag is "newest", "daily" or a number of hours such as "12h"')]);

const vmSchema = z.object({
  name: z.string().min(1).max(80).regex(/^[A-Za-z0-9][A-Za-z0-9 ._-]*$/, 'a VM name uses letters, digits, space, dot, dash and underscore'),
  cpus: z.number().int().min(1).max(128).default(2),
  memoryMiB: z.number().int().min(64).max(4 * 1024 * 1024).default(2048),
  firmware: z.enum(['bios', 'uefi']).default('bios'),
  network: z.string().min(1).optional(),
  serialLog: z.string().min(1).optional(),
}).strict();

export const jobSchema = z.object({
  version: z.literal(1),
  source: z.string().min(1),
  volume: z.string().min(1).optional(),
  target: z.string().min(1),
  disk: z.string().min(1).regex(/^[^/\\]+$/, 'disk is a file name without a folder'),
  format: z.enum(DISK_FORMATS),
  subformat: z.string().min(1).optional(),
  hypervisor: z.enum(HYPERVISORS).default('none'),
  vm: vmSchema.optional(),
  lag: lagSchema.default('newest'),
  bandwidthMBps: z.number().positive().optional(),
  ssh: z.object({ identity: z.string().min(1).optional(), knownHosts: z.string().min(1).optional() }).strict().optional(),
  passwordFile: z.string().min(1).optional(),
}).strict();

export type Job = z.infer<typeof jobSchema>;
export type VmSettingsInJob = z.infer<typeof vmSchema>;

/** The lag policy, parsed. */
export type Lag = { kind: 'newest' } | { kind: 'daily' } | { kind: 'hours'; hours: number };

export function parseLag(text: string): Lag {
  if (text === 'newest' || text === 'daily') return { kind: text };
  const m = /^([1-9][0-9]*)h$/.exec(text);
  if (!m) throw new UsageError(`--lag ${text}: say newest, daily, or a number of hours such as 12h`);
  return { kind: 'hours', hours: Number(m[1]) };
}

export function validateJob(doc: unknown, where: string): Job {
  const r = jobSchema.safeParse(doc);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const at = issue.path.length > 0 ? issue.path.join('.') : 'the file';
    throw new UsageError(`${where}: ${at}: ${issue.message}`, { path: issue.path });
  }
  const job = r.data;
  if (isSshUrl(job.target)) parseSshTarget(job.target);
  else if (!job.target.startsWith('/')) throw new UsageError(`${where}: target must be an absolute path or ssh://user@host[:port]/path`);
  if (job.hypervisor !== 'none' && !job.vm) throw new UsageError(`${where}: hypervisor ${job.hypervisor} needs "vm" settings (at least a name)`);
  return job;
}

export async function loadJob(path: string): Promise<Job> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new UsageError(`job file ${path} does not exist; create it with imagekeep headstart init`);
    throw new UsageError(`job file ${path} cannot be read: ${(e as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`job file ${path} is not JSON: ${(e as Error).message}`);
  }
  const job = validateJob(doc, path);
  // Relative paths in a job file are relative to the job file, not to wherever it is run from.
  const base = dirname(resolve(path));
  return {
    ...job,
    source: resolve(base, job.source),
    ...(job.passwordFile ? { passwordFile: resolve(base, job.passwordFile) } : {}),
  };
}

export async function saveJob(path: string, job: Job): Promise<void> {
  await writeFileAtomic(resolve(path), Buffer.from(JSON.stringify(job, null, 2) + '\n'));
}

/** Where the disk goes: a local folder or an SSH host and folder. */
export type TargetLocation = { kind: 'local'; dir: string } | { kind: 'ssh'; ssh: SshTarget; dir: string };

export function targetLocation(job: Job): TargetLocation {
  if (isSshUrl(job.target)) {
    const ssh = parseSshTarget(job.target);
    return { kind: 'ssh', ssh, dir: ssh.path };
  }
  return { kind: 'local', dir: job.target };
}

/** The disk file's default name for a VM or volume name and a format. */
export function defaultDiskName(stem: string, format: Job['format']): string {
  const ext = format === 'raw' ? 'img' : format;
  return `${stem.replace(/[^A-Za-z0-9._-]+/g, '_')}.${ext}`;
}
