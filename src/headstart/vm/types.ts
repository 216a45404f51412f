/**
 * The VM side of a standby disk: what the job engine asks of a hypervisor host, whatever its
 * kind. A `Hypervisor` is a set of operations over a `Host` (local or SSH), each addressed by
 * one `StandbyVm` (the settings, the disk's path on the host, its format), so every call can
 * find its VM by what it knows for sure: libvirt and Hyper-V by the VM name, ESXi by the VMX
 * path beside the disk (ESXi allows duplicate display names).
 *
 * Rules every implementation keeps:
 * - `check*` throw a UsageError that says what to choose instead; nothing touches the host.
 * - `define` writes the definition file beside the disk atomically, then registers it; it is
 *   idempotent, refuses while the VM runs (VmRunningError) and refuses a VM of the same name
 *   that is not on this disk (VM_NAME_TAKEN), rather than redefining someone else's VM.
 * - `testBoot` boots a throwaway copy-on-write layer over the disk, never the disk itself, has
 *   no network (a second copy of a production machine on the LAN would clash with it), and
 *   removes everything it created, also when it fails.
 */
import { ImagekeepError, RefusedError } from '../../formats/errors.js';
import type { Host } from '../host.js';

export type HypervisorKind = 'hyperv' | 'esx' | 'libvirt' | 'none';
export const HYPERVISOR_KINDS: readonly HypervisorKind[] = ['hyperv', 'esx', 'libvirt', 'none'];

export type Firmware = 'bios' | 'uefi';

export interface VmSettings {
  name: string;
  cpus: number;
  memoryMiB: number;
  /** Hyper-V's generation follows it: UEFI is Generation 2, BIOS Generation 1. */
  firmware: Firmware;
  /** libvirt network, Hyper-V virtual switch or ESXi port group; absent: no network adapter. */
  network?: string;
  /** Where the host writes the VM's first serial port (libvirt and ESXi; Hyper-V has only pipes). */
  serialLog?: string;
}

/** One standby VM: its settings and the disk it boots, as the host names it. */
export interface StandbyVm {
  settings: VmSettings;
  /** Absolute path on the host (for ESXi the VMDK descriptor; Hyper-V over SFTP: `/C:/VMs/x.vhdx`). */
  diskPath: string;
  /** vhdx, vhd, vmdk, qcow2 or raw. */
  diskFormat: string;
  /** For VMDK: ESXi needs `vmfs`. */
  diskSubformat?: string;
}

export interface DefineResult {
  /** The definition file written beside the disk (domain XML, VMX, PowerShell script). */
  definitionPath: string;
  /** The hypervisor's own id: libvirt domain UUID, ESXi Vmid, Hyper-V VM id. */
  id: string;
}

/** A test boot of a standby VM's disk. */
export interface TestBootRequest extends StandbyVm {
  /** Text the guest prints on its first serial port; the boot passes when it appears. */
  marker?: string;
  /** The whole test boot, from creating the overlay to seeing the marker. */
  timeoutMs: number;
  /** Without a marker: how long the VM must keep running to pass. Default 10 s (at most timeoutMs). */
  runMs?: number;
  signal?: AbortSignal;
  /** One line per step, for the CLI to show. */
  onProgress?: (message: string) => void;
}

export interface TestBootResult {
  /** The boot passed. A boot that ran and failed is `ok: false`; a test boot that could not be run throws. */
  ok: boolean;
  /** One line: how it passed, or why it did not ("marker not seen within 60 s; the console said …"). */
  detail: string;
  /** marker: seen on the serial port; heartbeat: Hyper-V integration services answered; ran: kept running `runMs`. */
  how?: 'marker' | 'heartbeat' | 'ran';
  elapsedMs: number;
  /** What the serial port showed (may be empty). */
  console: string;
  /** libvirt without a marker: a PNG of the screen, kept beside the disk. */
  screenshotPath?: string;
}

export interface Hypervisor {
  readonly kind: HypervisorKind;
  /** Refuses a disk this hypervisor cannot boot; Hyper-V needs the firmware (default BIOS). */
  checkDisk(format: string, subformat?: string, vm?: { firmware: Firmware }): void;
  /** Refuses settings this hypervisor cannot take (a bad name, memory not a multiple of its unit). */
  checkSettings(settings: VmSettings): void;
  define(host: Host, vm: StandbyVm): Promise<DefineResult>;
  /** Starts the defined VM; a VM that already runs is left alone. */
  start(host: Host, vm: StandbyVm): Promise<void>;
  /** True unless the VM is off or not defined: a paused, saved or suspended VM still owns its disk. */
  isRunning(host: Host, vm: StandbyVm): Promise<boolean>;
  /** Powers the VM off hard (no guest shutdown); a VM that is off or not defined is left alone. */
  stop(host: Host, vm: StandbyVm): Promise<void>;
  /** Refuses (VmRunningError) while the standby VM itself runs on the disk. */
  testBoot(host: Host, request: TestBootRequest): Promise<TestBootResult>;
}

/** The VM runs, so its definition and its disk are left alone. */
export class VmRunningError extends RefusedError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('VM_RUNNING', message, details);
  }
}

/** The hypervisor answered something we cannot read (unexpected command output). */
export class HypervisorError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('HYPERVISOR', message, details);
  }
}
