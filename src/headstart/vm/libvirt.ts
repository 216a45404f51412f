/**
 * libvirt with the QEMU driver: a domain XML written beside the disk and `virsh define`d;
 * every command goes through `host.run`, so the same code drives this machine or a KVM host
 * over SSH.
 *
 * Choices, for a disk restored from a physical machine whose drivers we do not know:
 * - machine q35 with the disk on SATA (AHCI is an inbox driver of every guest a physical
 *   machine ran; virtio would need drivers), an e1000e NIC for the same reason, a VGA
 *   display on VNC at 127.0.0.1 (the console, and what `virsh screenshot` reads);
 * - domain type `qemu` (software emulation) unless told `kvm`;
 * - UEFI is `<os firmware='efi'>` (libvirt picks the OVMF build) with secure boot off: the
 *   standby must boot whatever boot loader the source had;
 * - the domain's UUID is derived from the disk's path, so defining again is an update of
 *   the same domain and a different domain that holds the name is refused by libvirt.
 *
 * A test boot creates `qemu-img create -f qcow2 -b DISK -F FMT web.testboot.qcow2` beside
 * the disk, runs it as a transient domain (`virsh create`) named NAME-testboot with its own
 * serial file and no network, waits for the marker on the serial port (or, with no marker,
 * for it to keep running and saves a screenshot), then destroys it and removes the overlay.
 * QEMU opens a backing file read-only, so the standby disk is not written.
 */
import { createHash } from 'node:crypto';
import { RefusedError, UsageError } from '../../formats/errors.js';
import { runChecked, type Host } from '../host.js';
import { besideDisk, checkCommonSettings, commandFailed, checkTestBootOptions, testBootName, watchBoot, withCleanup } from './common.js';
import {
  VmRunningError,
  type DefineResult, type Firmware, type Hypervisor, type StandbyVm, type TestBootRequest, type TestBootResult, type VmSettings,
} from './types.js';

export interface LibvirtOptions {
  /** Default `qemu:///system`. */
  uri?: string;
  /** `qemu` (software emulation, the default) or `kvm`. */
  domainType?: 'qemu' | 'kvm';
}

export interface DomainXmlInput {
  settings: VmSettings;
  diskPath: string;
  diskFormat: 'qcow2' | 'raw';
  domainType: 'qemu' | 'kvm';
  /** Omitted: libvirt makes one (transient test domains). */
  uuid?: string;
  /** Default settings.serialLog. */
  serialPath?: string;
}

const LIBVIRT_FORMATS = ['qcow2', 'raw'];
const DEFAULT_RUN_MS = 10_000;

/** Escapes text for an XML attribute value or element content. */
export function xmlEscape(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[c]!);
}

/** A stable UUID for the domain of a disk (RFC 9562 layout, version 8: name-based, our hash). */
export function domainUuid(diskPath: string): string {
  const h = createHash('sha256').update(`imagekeep-libvirt-domain:${diskPath}`).digest();
  h[6] = (h[6]! & 0x0f) | 0x80;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const hex = h.subarray(0, 16).toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

export function domainXml(input: DomainXmlInput): string {
  const { settings } = input;
  const a = xmlEscape;
  const serial = input.serialPath ?? settings.serialLog;
  const firmware: Firmware = settings.firmware;
  const lines = [
    `<domain type='${input.domainType}'>`,
    `  <name>${a(settings.name)}</name>`,
    ...(input.uuid ? [`  <uuid>${input.uuid}</uuid>`] : []),
    `  <description>imagekeep HeadStart standby of ${a(input.diskPath)}</description>`,
    `  <memory unit='MiB'>${settings.memoryMiB}</memory>`,
    `  <vcpu>${settings.cpus}</vcpu>`,
    firmware === 'uefi' ? `  <os firmware='efi'>` : '  <os>',
    `    <type arch='x86_64' machine='q35'>hvm</type>`,
    ...(firmware === 'uefi' ? [`    <firmware><feature enabled='no' name='secure-boot'/></firmware>`] : []),
    `    <boot dev='hd'/>`,
    '  </os>',
    '  <features><acpi/><apic/></features>',
    // UTC: what Linux guests keep in the RTC. A Windows guest that kept local time shows the
    // clock shifted until it syncs; the setting can be changed in the XML.
    `  <clock offset='utc'/>`,
    '  <on_poweroff>destroy</on_poweroff>',
    '  <on_reboot>restart</on_reboot>',
    '  <on_crash>destroy</on_crash>',
    '  <devices>',
    `    <disk type='file' device='disk'>`,
    `      <driver name='qemu' type='${input.diskFormat}'/>`,
    `      <source file='${a(input.diskPath)}'/>`,
    `      <target dev='sda' bus='sata'/>`,
    '    </disk>',
    ...(settings.network !== undefined
      ? [`    <interface type='network'>`, `      <source network='${a(settings.network)}'/>`, `      <model type='e1000e'/>`, '    </interface>']
      : []),
    ...(serial !== undefined
      ? [`    <serial type='file'>`, `      <source path='${a(serial)}'/>`, `      <target port='0'/>`, '    </serial>']
      : []),
    `    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>`,
    `    <video><model type='vga'/></video>`,
    '  </devices>',
    '</domain>',
    '',
  ];
  return lines.join('\n');
}

export class LibvirtHypervisor implements Hypervisor {
  readonly kind = 'libvirt' as const;
  readonly uri: string;
  readonly domainType: 'qemu' | 'kvm';

  constructor(options: LibvirtOptions = {}) {
    this.uri = options.uri ?? 'qemu:///system';
    this.domainType = options.domainType ?? 'qemu';
  }

  checkDisk(format: string): void {
    if (!LIBVIRT_FORMATS.includes(format)) {
      throw new UsageError(`libvirt standby disks are qcow2 or raw, not ${format}; choose --format qcow2 (or raw)`, { hypervisor: 'libvirt', format });
    }
  }

  checkSettings(settings: VmSettings): void {
    checkCommonSettings(settings, 'libvirt');
  }

  private check(vm: StandbyVm): void {
    this.checkSettings(vm.settings);
    this.checkDisk(vm.diskFormat);
  }

  private virsh(host: Host, ...args: string[]): Promise<string> {
    return runChecked(host, ['virsh', '-c', this.uri, ...args]);
  }

  /**
   * Runs `virsh ARGS` about the domain `name`: its output, or null when the command failed
   * because there is no such domain. That is decided by `virsh list`, not by the wording of
   * the error, which a host may have translated.
   */
  private async virshIfDomain(host: Host, name: string, args: string[]): Promise<string | null> {
    const argv = ['virsh', '-c', this.uri, ...args];
    const r = await host.run(argv);
    if (r.code === 0) return r.stdout;
    const names = (await this.virsh(host, 'list', '--all', '--name')).split('\n').map((l) => l.trim());
    if (!names.includes(name)) return null;
    throw commandFailed(host, argv, r);
  }

  /** `virsh domstate`, or null when no domain has that name. */
  async domainState(host: Host, name: string): Promise<string | null> {
    return (await this.virshIfDomain(host, name, ['domstate', name]))?.trim() ?? null;
  }

  /** UUID and state of the domain named `name` (one `virsh dominfo`), or null when there is none. */
  private async domainInfo(host: Host, name: string): Promise<{ uuid: string; state: string } | null> {
    const out = await this.virshIfDomain(host, name, ['dominfo', name]);
    if (out === null) return null;
    const field = (key: string): string => new RegExp(`^${key}:\\s*(.*)$`, 'm').exec(out)?.[1]?.trim() ?? '';
    return { uuid: field('UUID'), state: field('State') };
  }

  async define(host: Host, vm: StandbyVm): Promise<DefineResult> {
    this.check(vm);
    const { name } = vm.settings;
    const uuid = domainUuid(vm.diskPath);
    const existing = await this.domainInfo(host, name);
    if (existing !== null && existing.uuid !== uuid) {
      throw new RefusedError('VM_NAME_TAKEN', `${host.label}: a libvirt domain named "${name}" already exists and is not the standby of ${vm.diskPath} (uuid ${existing.uuid}); choose another VM name or undefine that domain`, { name, uuid: existing.uuid });
    }
    if (existing !== null && existing.state !== 'shut off' && existing.state !== 'crashed') {
      throw new VmRunningError(`${host.label}: domain "${name}" is ${existing.state}; its definition is not changed while it runs`, { name, state: existing.state });
    }
    const definitionPath = besideDisk(vm.diskPath, '.xml');
    const xml = domainXml({ settings: vm.settings, diskPath: vm.diskPath, diskFormat: vm.diskFormat as 'qcow2' | 'raw', domainType: this.domainType, uuid });
    await host.writeFileAtomic(definitionPath, xml);
    await this.virsh(host, 'define', definitionPath);
    return { definitionPath, id: uuid };
  }

  async start(host: Host, vm: StandbyVm): Promise<void> {
    this.checkSettings(vm.settings);
    if (await this.isRunning(host, vm)) return;
    await this.virsh(host, 'start', vm.settings.name);
  }

  async isRunning(host: Host, vm: StandbyVm): Promise<boolean> {
    const state = await this.domainState(host, vm.settings.name);
    return state !== null && state !== 'shut off' && state !== 'crashed';
  }

  async stop(host: Host, vm: StandbyVm): Promise<void> {
    if (await this.isRunning(host, vm)) await this.destroy(host, vm.settings.name);
  }

  /** `virsh destroy`, quiet when the domain is already gone or off. */
  private async destroy(host: Host, name: string): Promise<void> {
    const argv = ['virsh', '-c', this.uri, 'destroy', name];
    const r = await host.run(argv);
    if (r.code === 0) return;
    const state = await this.domainState(host, name);
    if (state !== null && state !== 'shut off') throw commandFailed(host, argv, r);
  }

  async testBoot(host: Host, request: TestBootRequest): Promise<TestBootResult> {
    const vm = request;
    this.check(vm);
    const runMs = checkTestBootOptions(request, DEFAULT_RUN_MS);
    const say = request.onProgress ?? (() => {});
    if (await this.isRunning(host, vm)) {
      throw new VmRunningError(`${host.label}: domain "${vm.settings.name}" is running on the standby disk; a test boot needs it off`, { name: vm.settings.name });
    }
    const name = testBootName(vm.settings);
    const overlay = besideDisk(vm.diskPath, '.testboot.qcow2');
    const serial = besideDisk(vm.diskPath, '.testboot.serial.log');
    const xmlPath = besideDisk(vm.diskPath, '.testboot.xml');
    const screenshot = besideDisk(vm.diskPath, '.testboot.png');

    // What a killed earlier test boot may have left behind; a domain of that name on another disk is not ours.
    if ((await this.domainState(host, name)) !== null) {
      const disks = await this.virsh(host, 'domblklist', name);
      if (!disks.includes(overlay)) {
        throw new RefusedError('VM_NAME_TAKEN', `${host.label}: a libvirt domain named "${name}" exists and is not a test boot of ${vm.diskPath}; the test boot needs that name`, { name });
      }
      await this.destroy(host, name);
    }
    for (const p of [overlay, serial, xmlPath, screenshot]) await host.unlink(p, { missingOk: true });

    const started = Date.now();
    let domainCreated = false;
    // Destroy returns once QEMU has exited, so the overlay is closed when it is removed.
    const cleanup = async (): Promise<void> => {
      if (domainCreated) await this.destroy(host, name);
      for (const p of [overlay, serial, xmlPath]) await host.unlink(p, { missingOk: true });
    };
    return withCleanup(cleanup, async () => {
      say(`creating the overlay ${overlay} over ${vm.diskPath}`);
      await runChecked(host, ['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', vm.diskPath, '-F', vm.diskFormat, overlay]);
      const settings: VmSettings = { ...vm.settings, name };
      delete settings.network;
      await host.writeFileAtomic(xmlPath, domainXml({ settings, diskPath: overlay, diskFormat: 'qcow2', domainType: this.domainType, serialPath: serial }));
      say(`starting the transient domain ${name}`);
      await this.virsh(host, 'create', xmlPath);
      domainCreated = true;

      say(`watching ${name}`);
      return watchBoot(request, runMs, started, {
        readConsole: async () => (await host.readFile(serial))?.toString('utf8') ?? '',
        stoppedState: async () => {
          const state = await this.domainState(host, name);
          return state === null ? 'gone' : state === 'shut off' || state === 'crashed' ? state : null;
        },
        screenshot: async () => {
          await this.virsh(host, 'screenshot', name, screenshot);
          return screenshot;
        },
      });
    });
  }
}
