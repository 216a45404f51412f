/**
 * Microsoft Hyper-V: PowerShell scripts run over SSH on the Windows host as
 * `powershell -NoProfile -NonInteractive -EncodedCommand BASE64(UTF-16LE)`. The encoded form
 * is one word of [A-Za-z0-9+/=], so neither cmd.exe (Windows OpenSSH's default shell) nor
 * PowerShell as the shell re-parses it; every value inside the script is a single-quoted
 * PowerShell string. cmd.exe takes at most 8191 characters and the encoding makes a script
 * 2.7 times as long, so a longer script (a test boot with long paths) is written beside the
 * disk and run by a short one that reads it. Each script answers on one line, `IMAGEKEEP-RESULT {json}`, and on
 * failure writes the exception's message to stderr and exits 1.
 *
 * The generation follows the firmware: UEFI is Generation 2, which boots VHDX only; BIOS is
 * Generation 1 (VHD or VHDX, on IDE). Choices, for a disk restored from a physical machine:
 * - Generation 2 secure boot is OFF: Hyper-V's default template trusts only Windows boot
 *   loaders, and the standby must boot whatever the source booted (Linux shim, GRUB, ...).
 * - Static memory, no automatic checkpoints (a checkpoint would move the VM's writes to an
 *   AVHDX beside the disk), no automatic start with the host.
 * - No network adapter unless a switch is named.
 * - The VM's own files go to the host's default folder; the script that made it is kept
 *   beside the disk as NAME.ps1 (UTF-8 with BOM, CRLF: what Windows PowerShell 5.1 reads).
 * - A disk that NTFS marks sparse is cleared of the flag first: Hyper-V refuses sparse
 *   virtual disk files.
 * - `settings.serialLog` is ignored: Hyper-V connects COM ports to named pipes only.
 *
 * Paths: an SFTP path on a Windows OpenSSH host looks like `/C:/VMs/web.vhdx`; PowerShell is
 * given `C:\VMs\web.vhdx`. Other paths are passed as they are.
 *
 * Test boot: one script makes a differencing disk (`New-VHD -Differencing -ParentPath`) beside
 * the disk, a throwaway Generation-matched VM NAME-testboot on it with COM1 on a named pipe,
 * starts it, and reads the pipe until the marker appears (without a marker: until the guest's
 * heartbeat answers, or it has run `runMs`), then turns the VM off and removes it and the
 * differencing disk in a `finally`. The timeout runs inside the script; an AbortSignal cannot
 * stop it early.
 */
import { randomBytes } from 'node:crypto';
import { RefusedError, UsageError } from '../../formats/errors.js';
import { runChecked, type Host } from '../host.js';
import { besideDisk, checkCommonSettings, checkTestBootOptions, consoleTail, testBootName } from './common.js';
import {
  HypervisorError, VmRunningError,
  type DefineResult, type Firmware, type Hypervisor, type StandbyVm, type TestBootRequest, type TestBootResult, type VmSettings,
} from './types.js';

export interface HypervOptions {
  /** Default `powershell` (Windows PowerShell 5.1, where the Hyper-V module lives). */
  powershell?: string;
}

/**
 * cmd.exe, Windows OpenSSH's default shell, takes command lines of at most 8191 characters;
 * the encoded script must leave room for the words before it.
 */
export const MAX_COMMAND_LINE = 8191;

const RESULT_PREFIX = 'IMAGEKEEP-RESULT ';
const DEFAULT_RUN_MS = 10_000;
const BYTES_PER_MIB = 1024 * 1024;

/** A PowerShell single-quoted string. PowerShell also ends one at the typographic quotes ‘ ’ ‚ ‛, so they are doubled too. */
export function psQuote(text: string): string {
  return `'${text.replace(/['\u2018\u2019\u201a\u201b]/g, (c) => c + c)}'`;
}

/** `/C:/VMs/web.vhdx` (SFTP on a Windows OpenSSH host) → `C:\VMs\web.vhdx`; `C:/x` → `C:\x`; other paths as they are. */
export function windowsPath(path: string): string {
  const sftp = /^\/([A-Za-z]):(\/.*)?$/.exec(path);
  if (sftp) return `${sftp[1]!.toUpperCase()}:${(sftp[2] ?? '/').replace(/\//g, '\\')}`;
  if (/^[A-Za-z]:[\\/]/.test(path)) return path.replace(/\//g, '\\');
  return path;
}

export function generationOf(firmware: Firmware): 1 | 2 {
  return firmware === 'uefi' ? 2 : 1;
}

/** The argv that runs `script` with Windows PowerShell, or null when it would not fit cmd.exe's command line. */
export function powershellArgv(script: string, powershell = 'powershell'): string[] | null {
  const argv = [powershell, '-NoProfile', '-NonInteractive', '-EncodedCommand', Buffer.from(compact(script), 'utf16le').toString('base64')];
  return argv.join(' ').length <= MAX_COMMAND_LINE ? argv : null;
}

/**
 * A script too long for a command line is written to a file on the host and run by this
 * short one. A script block made from the file's text is not subject to the execution policy
 * that `-File` would be (Restricted on Windows clients).
 */
export function bootstrapScript(windowsScriptPath: string): string {
  return `# imagekeep hyperv file\n& ([ScriptBlock]::Create([IO.File]::ReadAllText(${psQuote(windowsScriptPath)})))\n`;
}

/** A script as a file for Windows PowerShell 5.1: UTF-8 with a BOM (without one it reads ANSI), CRLF lines. */
export function scriptFile(text: string): string {
  return '\ufeff' + text.replace(/\n/g, '\r\n');
}

/** Drops indentation and comment lines (the first line, naming the script, stays): the encoded form is 2.7 times as long. */
function compact(script: string): string {
  const lines = script.split('\n');
  return [lines[0]!, ...lines.slice(1).map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'))].join('\n');
}

/** Wraps a script body: stop on the first error, report it as one line on stderr, exit 1. */
function script(action: string, body: string[]): string {
  return [
    `# imagekeep hyperv ${action}`,
    "$ErrorActionPreference = 'Stop'",
    "$ProgressPreference = 'SilentlyContinue'",
    'try {',
    ...body.map((l) => `  ${l}`),
    '} catch {',
    '  [Console]::Error.WriteLine($_.Exception.Message)',
    '  exit 1',
    '}',
    '',
  ].join('\n');
}

/** The lines that give a new VM its settings (after New-VM made `$vm`). */
function configureVm(settings: VmSettings, withNetwork: boolean): string[] {
  const lines = [
    `Set-VMProcessor -VM $vm -Count ${settings.cpus}`,
    'Set-VMMemory -VM $vm -DynamicMemoryEnabled $false',
  ];
  if (!withNetwork || settings.network === undefined) lines.push('Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter');
  if (generationOf(settings.firmware) === 2) {
    lines.push('Set-VMFirmware -VM $vm -EnableSecureBoot Off -FirstBootDevice (Get-VMHardDiskDrive -VM $vm | Select-Object -First 1)');
  }
  lines.push(
    '# Hyper-V 2016 and later: no checkpoint at each start (it would redirect writes to an AVHDX).',
    "if ((Get-Command Set-VM).Parameters.ContainsKey('AutomaticCheckpointsEnabled')) { Set-VM -VM $vm -AutomaticCheckpointsEnabled $false }",
    'Set-VM -VM $vm -AutomaticStartAction Nothing',
  );
  return lines;
}

function newVm(settings: VmSettings, nameVar: string, vhdVar: string, withNetwork: boolean): string {
  const switchArg = withNetwork && settings.network !== undefined ? ` -SwitchName ${psQuote(settings.network)}` : '';
  return `$vm = New-VM -Name ${nameVar} -Generation ${generationOf(settings.firmware)} -MemoryStartupBytes ${settings.memoryMiB * BYTES_PER_MIB} -VHDPath ${vhdVar}${switchArg}`;
}

/** The VM of exactly this name (Get-VM -Name would read wildcards in it). */
const FIND_VM = '$vm = Get-VM | Where-Object { $_.Name -eq $name } | Select-Object -First 1';

/** Defines the VM on `vhdPath` (Windows form); an existing VM of the name on this disk, powered off, is replaced. */
export function defineScript(settings: VmSettings, vhdPath: string): string {
  return script('define', [
    `$name = ${psQuote(settings.name)}`,
    `$vhd = ${psQuote(vhdPath)}`,
    FIND_VM,
    'if ($vm) {',
    '  $disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object { $_.Path })',
    `  if ($disks -notcontains $vhd) { throw "a Hyper-V VM named '$name' exists on another disk ($($disks -join ', ')); choose another VM name or remove it" }`,
    `  if ($vm.State -ne 'Off') { throw "VM '$name' is $($vm.State); its definition is not changed while it runs" }`,
    '  # Only the definition goes: Remove-VM never deletes disks.',
    '  Remove-VM -VM $vm -Force',
    '}',
    "if ((Get-Item -LiteralPath $vhd).Attributes -band [IO.FileAttributes]::SparseFile) { fsutil.exe sparse setflag $vhd 0 | Out-Null }",
    newVm(settings, '$name', '$vhd', true),
    ...configureVm(settings, true),
    `Write-Output ('${RESULT_PREFIX}' + (ConvertTo-Json -Compress @{ id = $vm.Id.ToString(); generation = $vm.Generation }))`,
  ]);
}

/** `{exists, state, id, disks}` of the VM named `name`. */
export function stateScript(name: string): string {
  return script('state', [
    `$name = ${psQuote(name)}`,
    FIND_VM,
    "$r = @{ exists = $false }",
    'if ($vm) { $r = @{ exists = $true; state = $vm.State.ToString(); id = $vm.Id.ToString(); disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object { $_.Path }) } }',
    `Write-Output ('${RESULT_PREFIX}' + (ConvertTo-Json -Compress $r))`,
  ]);
}

export function startScript(name: string): string {
  return script('start', [
    `$name = ${psQuote(name)}`,
    FIND_VM,
    `if (-not $vm) { throw "no Hyper-V VM is named '$name'; define it first" }`,
    "switch ($vm.State.ToString()) { 'Running' { } 'Paused' { Resume-VM -VM $vm } default { Start-VM -VM $vm } }",
    `Write-Output ('${RESULT_PREFIX}' + (ConvertTo-Json -Compress @{ state = (Get-VM -Id $vm.Id).State.ToString() }))`,
  ]);
}

export function stopScript(name: string): string {
  return script('stop', [
    `$name = ${psQuote(name)}`,
    FIND_VM,
    "if ($vm -and $vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }",
    `Write-Output ('${RESULT_PREFIX}{}')`,
  ]);
}

export interface TestBootScriptInput {
  settings: VmSettings;
  /** Windows paths. */
  parentPath: string;
  childPath: string;
  marker?: string;
  timeoutMs: number;
  runMs: number;
  /** The COM1 pipe's name (without \\.\pipe\). */
  pipeName: string;
}

export function testBootScript(input: TestBootScriptInput): string {
  const { settings } = input;
  return script('testboot', [
    `$parent = ${psQuote(input.parentPath)}`,
    `$child = ${psQuote(input.childPath)}`,
    `$name = ${psQuote(testBootName(settings))}`,
    `$marker = ${input.marker === undefined ? '$null' : psQuote(input.marker)}`,
    `$pipeName = ${psQuote(input.pipeName)}`,
    `$timeoutMs = ${Math.round(input.timeoutMs)}`,
    `$runMs = ${Math.round(input.runMs)}`,
    '# What a killed earlier test boot may have left behind.',
    'foreach ($old in @(Get-VM | Where-Object { $_.Name -eq $name })) {',
    `  if (@(Get-VMHardDiskDrive -VM $old | ForEach-Object { $_.Path }) -notcontains $child) { throw "a Hyper-V VM named '$name' exists and is not a test boot of $parent; the test boot needs that name" }`,
    '  Stop-VM -VM $old -TurnOff -Force -ErrorAction SilentlyContinue',
    '  Remove-VM -VM $old -Force',
    '}',
    'if (Test-Path -LiteralPath $child) { Remove-Item -LiteralPath $child -Force }',
    '# The child takes every write; the parent is opened read-only.',
    'New-VHD -Path $child -ParentPath $parent -Differencing | Out-Null',
    '$vm = $null; $pipe = $null',
    "$r = @{ ok = $false; how = $null; console = ''; stopped = $null }",
    '$clock = [Diagnostics.Stopwatch]::StartNew()',
    'try {',
    `  ${newVm(settings, '$name', '$child', false)}`,
    ...configureVm(settings, false).map((l) => `  ${l}`),
    "  Set-VMComPort -VM $vm -Number 1 -Path ('\\\\.\\pipe\\' + $pipeName)",
    '  Start-VM -VM $vm',
    "  $pipe = New-Object IO.Pipes.NamedPipeClientStream('.', $pipeName, [IO.Pipes.PipeDirection]::In)",
    '  $buf = New-Object byte[] 4096; $read = $null; $text = New-Object Text.StringBuilder',
    '  while ($true) {',
    '    # The pipe exists once the VM runs; a read stays pending until COM1 sends a byte.',
    '    if (-not $pipe.IsConnected) { try { $pipe.Connect(250) } catch { } }',
    '    elseif ($null -eq $read) { $read = $pipe.ReadAsync($buf, 0, $buf.Length) }',
    '    if ($null -ne $read -and $read.Wait(250)) { $n = $read.Result; $read = $null; if ($n -gt 0) { [void]$text.Append([Text.Encoding]::UTF8.GetString($buf, 0, $n)) } }',
    '    $r.console = $text.ToString()',
    "    if ($null -ne $marker -and $r.console.Contains($marker)) { $r.ok = $true; $r.how = 'marker'; break }",
    '    $vm = Get-VM -Id $vm.Id',
    "    if ($vm.State -ne 'Running') { $r.stopped = $vm.State.ToString(); break }",
    `    if ($null -eq $marker -and "$($vm.Heartbeat)" -like 'Ok*') { $r.ok = $true; $r.how = 'heartbeat'; break }`,
    "    if ($null -eq $marker -and $clock.ElapsedMilliseconds -ge $runMs) { $r.ok = $true; $r.how = 'ran'; break }",
    '    if ($clock.ElapsedMilliseconds -ge $timeoutMs) { break }',
    '  }',
    '} finally {',
    '  if ($pipe) { $pipe.Dispose() }',
    '  if ($vm) { Stop-VM -VM $vm -TurnOff -Force -ErrorAction SilentlyContinue; Remove-VM -VM $vm -Force }',
    '  Remove-Item -LiteralPath $child -Force -ErrorAction SilentlyContinue',
    '}',
    '$r.elapsedMs = $clock.ElapsedMilliseconds',
    `Write-Output ('${RESULT_PREFIX}' + (ConvertTo-Json -Compress $r))`,
  ]);
}

/** The JSON a script printed after RESULT_PREFIX. */
function parseResult<T>(host: Host, action: string, stdout: string): T {
  const line = stdout.split(/\r?\n/).reverse().find((l) => l.startsWith(RESULT_PREFIX));
  if (line === undefined) throw new HypervisorError(`${host.label}: the Hyper-V ${action} script printed no result: ${stdout.trim().split('\n').pop() ?? '(nothing)'}`, { stdout });
  try {
    return JSON.parse(line.slice(RESULT_PREFIX.length)) as T;
  } catch {
    throw new HypervisorError(`${host.label}: the Hyper-V ${action} script printed an unreadable result: ${line}`, { stdout });
  }
}

interface VmState {
  exists: boolean;
  state?: string;
  id?: string;
  disks?: string[];
}

export class HypervHypervisor implements Hypervisor {
  readonly kind = 'hyperv' as const;
  readonly powershell: string;

  constructor(options: HypervOptions = {}) {
    this.powershell = options.powershell ?? 'powershell';
  }

  checkDisk(format: string, _subformat?: string, vm: { firmware: Firmware } = { firmware: 'bios' }): void {
    if (format === 'vhdx') return;
    if (format === 'vhd') {
      if (vm.firmware === 'uefi') {
        throw new UsageError('Hyper-V boots UEFI VMs as Generation 2, which takes VHDX only; choose --format vhdx, or BIOS firmware for a Generation 1 VM on VHD', { hypervisor: 'hyperv', format, firmware: vm.firmware });
      }
      return;
    }
    throw new UsageError(`Hyper-V standby disks are VHDX (or VHD for a Generation 1, BIOS VM), not ${format}; choose --format vhdx`, { hypervisor: 'hyperv', format });
  }

  checkSettings(settings: VmSettings): void {
    checkCommonSettings(settings, 'Hyper-V');
    if (settings.memoryMiB < 32 || settings.memoryMiB % 2 !== 0) {
      throw new UsageError(`Hyper-V: memory must be an even number of MiB, at least 32, not ${settings.memoryMiB}`, { memoryMiB: settings.memoryMiB });
    }
  }

  private check(vm: StandbyVm): void {
    this.checkSettings(vm.settings);
    this.checkDisk(vm.diskFormat, vm.diskSubformat, vm.settings);
  }

  /**
   * Runs a script as -EncodedCommand, or, when that is too long, from the file `spill` on
   * the host (written here and removed afterwards, unless `keep`: the file is already there).
   */
  private async runScript<T>(host: Host, action: string, text: string, spill?: { path: string; keep?: boolean }): Promise<T> {
    const argv = powershellArgv(text, this.powershell);
    if (argv) return parseResult<T>(host, action, await runChecked(host, argv));
    if (!spill) throw new HypervisorError(`the Hyper-V ${action} script is too long for a command line`, { action });
    if (!spill.keep) await host.writeFileAtomic(spill.path, scriptFile(text));
    try {
      return parseResult<T>(host, action, await runChecked(host, powershellArgv(bootstrapScript(windowsPath(spill.path)), this.powershell)!));
    } finally {
      if (!spill.keep) await host.unlink(spill.path, { missingOk: true });
    }
  }

  private state(host: Host, name: string): Promise<VmState> {
    return this.runScript<VmState>(host, 'state', stateScript(name));
  }

  async define(host: Host, vm: StandbyVm): Promise<DefineResult> {
    this.check(vm);
    const { name } = vm.settings;
    const vhd = windowsPath(vm.diskPath);
    const existing = await this.state(host, name);
    if (existing.exists) {
      if (!(existing.disks ?? []).some((d) => d.toLowerCase() === vhd.toLowerCase())) {
        throw new RefusedError('VM_NAME_TAKEN', `${host.label}: a Hyper-V VM named "${name}" exists on another disk (${(existing.disks ?? []).join(', ') || 'none'}); choose another VM name or remove it`, { name, disks: existing.disks });
      }
      if (existing.state !== 'Off') throw new VmRunningError(`${host.label}: VM "${name}" is ${existing.state}; its definition is not changed while it runs`, { name, state: existing.state });
    }
    const text = defineScript(vm.settings, vhd);
    const definitionPath = besideDisk(vm.diskPath, '.ps1');
    // For the record, and to run by hand.
    await host.writeFileAtomic(definitionPath, scriptFile(text));
    const r = await this.runScript<{ id: string; generation: number }>(host, 'define', text, { path: definitionPath, keep: true });
    return { definitionPath, id: r.id };
  }

  async start(host: Host, vm: StandbyVm): Promise<void> {
    this.checkSettings(vm.settings);
    await this.runScript(host, 'start', startScript(vm.settings.name));
  }

  async isRunning(host: Host, vm: StandbyVm): Promise<boolean> {
    const s = await this.state(host, vm.settings.name);
    return s.exists && s.state !== 'Off';
  }

  async stop(host: Host, vm: StandbyVm): Promise<void> {
    await this.runScript(host, 'stop', stopScript(vm.settings.name));
  }

  async testBoot(host: Host, request: TestBootRequest): Promise<TestBootResult> {
    const vm = request;
    this.check(vm);
    const runMs = checkTestBootOptions(request, DEFAULT_RUN_MS);
    if (await this.isRunning(host, vm)) {
      throw new VmRunningError(`${host.label}: the standby VM "${vm.settings.name}" is running; a test boot needs it off`, { name: vm.settings.name });
    }
    const extension = vm.diskFormat === 'vhd' ? '.vhd' : '.vhdx';
    const text = testBootScript({
      settings: vm.settings,
      parentPath: windowsPath(vm.diskPath),
      childPath: windowsPath(besideDisk(vm.diskPath, `.testboot${extension}`)),
      ...(request.marker !== undefined ? { marker: request.marker } : {}),
      timeoutMs: request.timeoutMs,
      runMs,
      pipeName: `imagekeep-testboot-${randomBytes(6).toString('hex')}`,
    });
    request.onProgress?.(`running the test boot of ${testBootName(vm.settings)} on ${host.label} (at most ${Math.round(request.timeoutMs / 1000)} s)`);
    const r = await this.runScript<{ ok: boolean; how: 'marker' | 'heartbeat' | 'ran' | null; console: string | null; stopped: string | null; elapsedMs: number }>(
      host, 'testboot', text, { path: besideDisk(vm.diskPath, '.testboot.ps1') });
    const console = r.console ?? '';
    const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
    let detail: string;
    if (r.ok && r.how === 'marker') detail = `"${request.marker}" appeared on COM1 after ${seconds(r.elapsedMs)}`;
    else if (r.ok && r.how === 'heartbeat') detail = `the guest's heartbeat answered after ${seconds(r.elapsedMs)}`;
    else if (r.ok) detail = `the VM kept running for ${seconds(r.elapsedMs)} (no marker was asked for)`;
    else if (r.stopped) detail = `the VM stopped (${r.stopped}) after ${seconds(r.elapsedMs)}; COM1 said: ${consoleTail(console) || '(nothing)'}`;
    else detail = `"${request.marker}" did not appear on COM1 within ${seconds(request.timeoutMs)}; it said: ${consoleTail(console) || '(nothing)'}`;
    return { ok: r.ok, detail, elapsedMs: r.elapsedMs, console, ...(r.ok && r.how ? { how: r.how } : {}) };
  }
}
