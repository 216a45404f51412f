/**
 * VMware ESXi: a VMX written beside the VMDK descriptor, registered and powered on with
 * `vim-cmd` over SSH. ESXi boots only its native `vmfs` layout (descriptor + `-flat.vmdk`);
 * hosted sparse VMDKs (monolithicSparse, streamOptimized) do not power on there, so `define`
 * also reads the descriptor's createType on the host.
 *
 * A VM is found by its VMX path, not by name (ESXi allows two VMs with one display name):
 * `vim-cmd vmsvc/getallvms` lists `[datastore] folder/web.vmx`, which is
 * `/vmfs/volumes/datastore/folder/web.vmx`; a target named through the datastore's UUID
 * is matched by resolving both with `readlink -f`.
 *
 * Choices, for a disk restored from a physical machine:
 * - LSI Logic SAS (`lsisas1068`) by default: an inbox driver of Windows since 2008 and of
 *   Linux (mptsas); PVSCSI needs VMware's driver in the guest. An e1000e NIC for the same
 *   reason. `guestOS = "other-64"` unless told: we do not know the guest.
 * - UEFI is `firmware = "efi"` with secure boot off (the standby must boot whatever loader
 *   the source had). virtualHW.version 14: ESXi 6.7 and later.
 *
 * Test boot: ESXi cannot make a child delta disk without a snapshot of a VM (vmkfstools
 * creates and clones disks, not deltas), so the throwaway VM attaches the descriptor in
 * `independent-nonpersistent` mode: ESXi sends every write to a redo log in the VM's folder
 * and deletes it at power-off, leaving the disk unchanged. That VM, NAME-testboot, has its
 * own VMX, log, NVRAM and serial-port file beside the disk, no network, questions
 * auto-answered, and is powered off, unregistered and removed afterwards.
 */
import { posix } from 'node:path';
import { UsageError } from '../../formats/errors.js';
import { runChecked, type Host } from '../host.js';
import { besideDisk, checkCommonSettings, checkTestBootOptions, testBootName, watchBoot, withCleanup } from './common.js';
import {
  HypervisorError, VmRunningError,
  type DefineResult, type Hypervisor, type StandbyVm, type TestBootRequest, type TestBootResult, type VmSettings,
} from './types.js';

export type EsxScsiController = 'lsisas1068' | 'lsilogic' | 'pvscsi';

export interface EsxOptions {
  /** Where ESXi mounts datastores. Default /vmfs/volumes. */
  datastoreRoot?: string;
  scsiController?: EsxScsiController;
  /** Default 14 (ESXi 6.7 and later). */
  virtualHwVersion?: number;
  /** Default other-64. */
  guestOs?: string;
}

export interface VmxInput {
  settings: VmSettings;
  /** The descriptor's file name, in the VMX's folder. */
  descriptorName: string;
  scsiController: EsxScsiController;
  virtualHwVersion: number;
  guestOs: string;
  /** A throwaway test VM: nonpersistent disk, its own log and serial file, no network. */
  testBoot?: { serialFileName: string; logFileName: string };
}

/** One line of `vim-cmd vmsvc/getallvms`. */
export interface RegisteredVm {
  vmid: string;
  name: string;
  datastore: string;
  /** The VMX path inside the datastore. */
  relativePath: string;
}

const DEFAULT_RUN_MS = 10_000;

/**
 * Quotes a VMX value. VMX files escape a byte as `|` and two hex digits (`"` is `|22`);
 * VMware writes `#`, `|` and control characters that way too.
 */
export function vmxQuote(value: string): string {
  return `"${value.replace(/[\u0000-\u001f\u007f"#|]/g, (c) => `|${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`)}"`;
}

export function vmx(input: VmxInput): string {
  const { settings, testBoot } = input;
  const entries: [string, string][] = [
    ['.encoding', 'UTF-8'],
    ['config.version', '8'],
    ['virtualHW.version', String(input.virtualHwVersion)],
    ['displayName', testBoot ? `${settings.name}-testboot` : settings.name],
    ['guestOS', input.guestOs],
    ['numvcpus', String(settings.cpus)],
    ['memSize', String(settings.memoryMiB)],
  ];
  if (settings.firmware === 'uefi') entries.push(['firmware', 'efi'], ['uefi.secureBoot.enabled', 'FALSE']);
  entries.push(
    ['pciBridge0.present', 'TRUE'],
    ['scsi0.present', 'TRUE'],
    ['scsi0.virtualDev', input.scsiController],
    ['scsi0:0.present', 'TRUE'],
    ['scsi0:0.deviceType', 'scsi-hardDisk'],
    ['scsi0:0.fileName', input.descriptorName],
  );
  if (testBoot) {
    entries.push(
      // Writes go to a redo log that ESXi deletes at power-off: the disk is not changed.
      ['scsi0:0.mode', 'independent-nonpersistent'],
      ['serial0.present', 'TRUE'],
      ['serial0.fileType', 'file'],
      ['serial0.fileName', testBoot.serialFileName],
      ['log.fileName', testBoot.logFileName],
      // A throwaway VM must never stop at "did you move or copy it?".
      ['msg.autoAnswer', 'TRUE'],
    );
  } else {
    if (settings.network !== undefined) {
      entries.push(
        ['ethernet0.present', 'TRUE'],
        ['ethernet0.virtualDev', 'e1000e'],
        ['ethernet0.networkName', settings.network],
        ['ethernet0.addressType', 'generated'],
      );
    }
    if (settings.serialLog !== undefined) {
      entries.push(['serial0.present', 'TRUE'], ['serial0.fileType', 'file'], ['serial0.fileName', settings.serialLog]);
    }
  }
  return entries.map(([k, v]) => `${k} = ${vmxQuote(v)}`).join('\n') + '\n';
}

/** Parses `vim-cmd vmsvc/getallvms`; lines that are not VMs ("Skipping invalid VM") are ignored. */
export function parseGetAllVms(text: string): RegisteredVm[] {
  const vms: RegisteredVm[] = [];
  for (const line of text.split(/\r?\n/)) {
    // Vmid, Name (may hold spaces), [datastore] path.vmx, Guest OS, Version, Annotation.
    const m = /^(\d+)\s+(.*?)\s+\[([^\]]+)\]\s+(.*?\.vmx)(\s|$)/.exec(line);
    if (m) vms.push({ vmid: m[1]!, name: m[2]!, datastore: m[3]!, relativePath: m[4]! });
  }
  return vms;
}

export class EsxHypervisor implements Hypervisor {
  readonly kind = 'esx' as const;
  readonly datastoreRoot: string;
  readonly scsiController: EsxScsiController;
  readonly virtualHwVersion: number;
  readonly guestOs: string;

  constructor(options: EsxOptions = {}) {
    this.datastoreRoot = options.datastoreRoot ?? '/vmfs/volumes';
    this.scsiController = options.scsiController ?? 'lsisas1068';
    this.virtualHwVersion = options.virtualHwVersion ?? 14;
    this.guestOs = options.guestOs ?? 'other-64';
  }

  checkDisk(format: string, subformat?: string): void {
    if (format !== 'vmdk') {
      throw new UsageError(`ESXi standby disks are VMDK in its native vmfs layout, not ${format}; choose --format vmdk --subformat vmfs`, { hypervisor: 'esx', format });
    }
    if (subformat !== 'vmfs') {
      throw new UsageError(`ESXi powers on only its native vmfs VMDK layout (descriptor + -flat.vmdk), not ${subformat ?? 'the default hosted sparse VMDK'}; choose --subformat vmfs`, { hypervisor: 'esx', format, subformat });
    }
  }

  checkSettings(settings: VmSettings): void {
    checkCommonSettings(settings, 'ESXi');
    if (settings.memoryMiB % 4 !== 0) throw new UsageError(`ESXi: memory must be a multiple of 4 MiB, not ${settings.memoryMiB} MiB`, { memoryMiB: settings.memoryMiB });
  }

  /** Settings and the disk as it is on the host: a vmfs descriptor. The job's subformat, when given, must say vmfs too. */
  private async check(host: Host, vm: StandbyVm): Promise<void> {
    this.checkSettings(vm.settings);
    this.checkDisk(vm.diskFormat, vm.diskSubformat ?? 'vmfs');
    if (!vm.diskPath.endsWith('.vmdk')) throw new UsageError(`ESXi: the disk ${vm.diskPath} must be a .vmdk descriptor`);
    const createType = await descriptorCreateType(host, vm.diskPath);
    if (createType !== 'vmfs' && createType !== 'vmfsThin') {
      throw new UsageError(`ESXi: ${host.label}:${vm.diskPath} is ${createType === null ? 'not a VMDK text descriptor' : `a ${createType} VMDK`}; ESXi powers on only its native vmfs layout (descriptor + -flat.vmdk)`, { createType });
    }
  }

  private vmxPath(vm: StandbyVm): string {
    return besideDisk(vm.diskPath, '.vmx');
  }

  /** The registered VM whose VMX is `vmxPath`, or null. */
  async findByPath(host: Host, vmxPath: string): Promise<RegisteredVm | null> {
    const vms = parseGetAllVms(await runChecked(host, ['vim-cmd', 'vmsvc/getallvms']));
    const exact = vms.find((v) => posix.join(this.datastoreRoot, v.datastore, v.relativePath) === vmxPath);
    if (exact) return exact;
    // The same file named through another alias of the datastore (its UUID, or a symlink).
    const candidates = vms.filter((v) => vmxPath.endsWith(`/${v.relativePath}`));
    if (candidates.length === 0) return null;
    const ours = await resolvePath(host, vmxPath);
    for (const v of candidates) {
      if ((await resolvePath(host, posix.join(this.datastoreRoot, v.datastore, v.relativePath))) === ours) return v;
    }
    return null;
  }

  private async powerState(host: Host, vmid: string): Promise<string> {
    const out = await runChecked(host, ['vim-cmd', 'vmsvc/power.getstate', vmid]);
    // "Retrieved runtime info\nPowered on"
    const state = out.split(/\r?\n/).map((l) => l.trim()).filter((l) => /^(Powered|Suspended)/i.test(l)).pop();
    if (!state) throw new HypervisorError(`${host.label}: vim-cmd vmsvc/power.getstate ${vmid} answered no power state: ${out.trim().split('\n').pop() ?? ''}`, { vmid, out });
    return state;
  }

  private async register(host: Host, vmxPath: string, name: string): Promise<string> {
    const out = await runChecked(host, ['vim-cmd', 'solo/registervm', vmxPath, name]);
    const m = /^\s*(\d+)\s*$/m.exec(out);
    if (m) return m[1]!;
    const found = await this.findByPath(host, vmxPath);
    if (!found) throw new HypervisorError(`${host.label}: vim-cmd solo/registervm ${vmxPath} answered "${out.trim()}" and the VM is not listed`, { vmxPath, out });
    return found.vmid;
  }

  async define(host: Host, vm: StandbyVm): Promise<DefineResult> {
    await this.check(host, vm);
    const vmxPath = this.vmxPath(vm);
    const existing = await this.findByPath(host, vmxPath);
    if (existing && (await this.powerState(host, existing.vmid)) !== 'Powered off') {
      throw new VmRunningError(`${host.label}: VM ${existing.vmid} (${existing.name}) is not powered off; its VMX is not changed while it runs`, { vmid: existing.vmid });
    }
    await host.writeFileAtomic(vmxPath, this.vmxFor(vm));
    if (existing) {
      // Registered already: make ESXi read the rewritten VMX.
      await runChecked(host, ['vim-cmd', 'vmsvc/reload', existing.vmid]);
      return { definitionPath: vmxPath, id: existing.vmid };
    }
    return { definitionPath: vmxPath, id: await this.register(host, vmxPath, vm.settings.name) };
  }

  vmxFor(vm: StandbyVm, testBoot?: VmxInput['testBoot']): string {
    return vmx({
      settings: vm.settings,
      descriptorName: posix.basename(vm.diskPath),
      scsiController: this.scsiController,
      virtualHwVersion: this.virtualHwVersion,
      guestOs: this.guestOs,
      ...(testBoot ? { testBoot } : {}),
    });
  }

  private async registered(host: Host, vm: StandbyVm): Promise<RegisteredVm> {
    const found = await this.findByPath(host, this.vmxPath(vm));
    if (!found) throw new UsageError(`${host.label}: no VM is registered for ${this.vmxPath(vm)}; define it first`);
    return found;
  }

  async start(host: Host, vm: StandbyVm): Promise<void> {
    const { vmid } = await this.registered(host, vm);
    if ((await this.powerState(host, vmid)) === 'Powered on') return;
    await runChecked(host, ['vim-cmd', 'vmsvc/power.on', vmid]);
  }

  async isRunning(host: Host, vm: StandbyVm): Promise<boolean> {
    const found = await this.findByPath(host, this.vmxPath(vm));
    return found !== null && (await this.powerState(host, found.vmid)) !== 'Powered off';
  }

  async stop(host: Host, vm: StandbyVm): Promise<void> {
    const found = await this.findByPath(host, this.vmxPath(vm));
    if (found && (await this.powerState(host, found.vmid)) !== 'Powered off') await runChecked(host, ['vim-cmd', 'vmsvc/power.off', found.vmid]);
  }

  /** Powers off and unregisters a VM; its files stay. */
  private async remove(host: Host, vmid: string): Promise<void> {
    if ((await this.powerState(host, vmid)) !== 'Powered off') await runChecked(host, ['vim-cmd', 'vmsvc/power.off', vmid]);
    await runChecked(host, ['vim-cmd', 'vmsvc/unregister', vmid]);
  }

  async testBoot(host: Host, request: TestBootRequest): Promise<TestBootResult> {
    const vm = request;
    await this.check(host, vm);
    const runMs = checkTestBootOptions(request, DEFAULT_RUN_MS);
    const say = request.onProgress ?? (() => {});
    if (await this.isRunning(host, vm)) {
      throw new VmRunningError(`${host.label}: the standby VM ${vm.settings.name} is powered on; a test boot needs it off`, { name: vm.settings.name });
    }
    const testVmx = besideDisk(vm.diskPath, '.testboot.vmx');
    const serial = besideDisk(vm.diskPath, '.testboot.serial.log');
    const log = besideDisk(vm.diskPath, '.testboot.log');
    const nvram = besideDisk(vm.diskPath, '.testboot.nvram');
    const files = [testVmx, serial, log, nvram];

    // What a killed earlier test boot may have left behind.
    const leftover = await this.findByPath(host, testVmx);
    if (leftover) await this.remove(host, leftover.vmid);
    for (const p of files) await host.unlink(p, { missingOk: true });

    const started = Date.now();
    let vmid: string | null = null;
    const cleanup = async (): Promise<void> => {
      if (vmid !== null) await this.remove(host, vmid);
      for (const p of files) await host.unlink(p, { missingOk: true });
    };
    return withCleanup(cleanup, async () => {
      await host.writeFileAtomic(testVmx, this.vmxFor(vm, { serialFileName: posix.basename(serial), logFileName: posix.basename(log) }));
      say(`registering ${testBootName(vm.settings)} (${testVmx}) with its disk nonpersistent`);
      vmid = await this.register(host, testVmx, testBootName(vm.settings));
      say(`powering on VM ${vmid}`);
      await runChecked(host, ['vim-cmd', 'vmsvc/power.on', vmid]);
      const id = vmid;
      return watchBoot(request, runMs, started, {
        readConsole: async () => (await host.readFile(serial))?.toString('utf8') ?? '',
        stoppedState: async () => {
          const state = await this.powerState(host, id);
          return state === 'Powered on' ? null : state.toLowerCase();
        },
      });
    });
  }
}

/** The createType of a VMDK text descriptor, or null when the file does not start with one. */
async function descriptorCreateType(host: Host, path: string): Promise<string | null> {
  const file = await host.open(path, 'r').catch((e: unknown) => {
    throw new UsageError(`ESXi: cannot open the disk ${host.label}:${path}: ${(e as Error).message}`);
  });
  try {
    // A descriptor is a few hundred bytes; a sparse VMDK starts with binary "KDMV" instead.
    const head = Buffer.alloc(Math.min(await file.size(), 64 * 1024));
    if (head.length > 0) await file.read(head, 0);
    const text = head.toString('latin1');
    if (!text.startsWith('# Disk DescriptorFile')) return null;
    return /^createType\s*=\s*"([^"]*)"/m.exec(text)?.[1] ?? null;
  } finally {
    await file.close();
  }
}

async function resolvePath(host: Host, path: string): Promise<string> {
  const r = await host.run(['readlink', '-f', path]);
  return r.code === 0 ? r.stdout.trim() : path;
}

