/**
 * From a job to the host its disk lives on. An SSH target logs in with the job's key (else
 * the user's usual ~/.ssh/id_ed25519, id_ecdsa or id_rsa) and checks the host key against
 * the job's known_hosts (else ~/.ssh/known_hosts): an unknown or changed key is refused.
 * The key is read from its file and handed to ssh2 in memory: it never appears in a process
 * list or a log.
 */
import { access } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { UsageError } from '../formats/errors.js';
import { LocalHost, SshHost, type Host } from './host.js';
import { targetLocation, type Job } from './job.js';

const DEFAULT_KEYS = ['id_ed25519', 'id_ecdsa', 'id_rsa'];

async function defaultIdentity(): Promise<string> {
  for (const name of DEFAULT_KEYS) {
    const path = join(homedir(), '.ssh', name);
    if (await access(path).then(() => true, () => false)) return path;
  }
  throw new UsageError(`no SSH key: none of ~/.ssh/${DEFAULT_KEYS.join(', ~/.ssh/')} exists; name one in the job ("ssh": {"identity": FILE}) or with --identity`);
}

export async function connectTarget(job: Job): Promise<{ host: Host; dir: string }> {
  const where = targetLocation(job);
  if (where.kind === 'local') return { host: new LocalHost(), dir: where.dir };
  const host = await SshHost.connect({
    host: where.ssh.host,
    port: where.ssh.port,
    username: where.ssh.username,
    privateKey: job.ssh?.identity ?? (await defaultIdentity()),
    ...(job.ssh?.knownHosts ? { knownHostsPath: job.ssh.knownHosts } : {}),
  });
  return { host, dir: where.dir };
}
