/**
 * The hypervisors a standby VM can live on, built explicitly by kind (nothing registers
 * itself on import). `none` is the job without a VM: any disk format, nothing to define,
 * never running, and no test boot.
 */
import { UsageError } from '../../formats/errors.js';
import type { Host } from '../host.js';
import { EsxHypervisor, type EsxOptions } from './esx.js';
import { HypervHypervisor, type HypervOptions } from './hyperv.js';
import { LibvirtHypervisor, type LibvirtOptions } from './libvirt.js';
import type { DefineResult, Hypervisor, HypervisorKind, StandbyVm, TestBootResult } from './types.js';

export * from './types.js';
export { EsxHypervisor, parseGetAllVms, vmx, vmxQuote, type EsxOptions, type EsxScsiController, type RegisteredVm } from './esx.js';
export {
  HypervHypervisor, bootstrapScript, defineScript, generationOf, powershellArgv, scriptFile, psQuote, startScript, stateScript, stopScript, testBootScript, windowsPath,
  type HypervOptions,
} from './hyperv.js';
export { LibvirtHypervisor, domainUuid, domainXml, xmlEscape, type LibvirtOptions } from './libvirt.js';

export class NoHypervisor implements Hypervisor {
  readonly kind = 'none' as const;
  checkDisk(): void {}
  checkSettings(): void {}
  async define(_host: Host, _vm: StandbyVm): Promise<DefineResult> {
    throw new UsageError('the job has no hypervisor (none): there is no VM to define; set hypervisor to hyperv, esx or libvirt');
  }
  async start(): Promise<void> {
    throw new UsageError('the job has no hypervisor (none): there is no VM to start; start a VM on the disk yourself');
  }
  async isRunning(): Promise<boolean> {
    return false;
  }
  async stop(): Promise<void> {}
  async testBoot(): Promise<TestBootResult> {
    throw new UsageError('a test boot needs a hypervisor in the job (libvirt, esx or hyperv)');
  }
}

export interface HypervisorOptions {
  libvirt?: LibvirtOptions;
  esx?: EsxOptions;
  hyperv?: HypervOptions;
}

export function hypervisorFor(kind: HypervisorKind, options: HypervisorOptions = {}): Hypervisor {
  switch (kind) {
    case 'libvirt':
      return new LibvirtHypervisor(options.libvirt);
    case 'esx':
      return new EsxHypervisor(options.esx);
    case 'hyperv':
      return new HypervHypervisor(options.hyperv);
    case 'none':
      return new NoHypervisor();
    default:
      throw new UsageError(`unknown hypervisor "${String(kind)}"; choose hyperv, esx, libvirt or none`);
  }
}
