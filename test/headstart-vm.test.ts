// Proves the VM side of HeadStart: real libvirt (QEMU driver) defines and boots raw and qcow2 standby disks over a real sshd and a test boot on a throwaway overlay sees the boot sector's serial marker and leaves the disk byte-for-byte unchanged; ESXi and Hyper-V are driven through stand-in vim-cmd and powershell commands that record what they were asked; wrong disks and settings are refused with clear messages.
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { bootSector, MAX_BOOT_MARKER_BYTES } from '../src/devkit/boot-sector.js';
import { UsageError } from '../src/formats/errors.js';
import { LocalFile } from '../src/formats/local-file.js';
import { localOpener } from '../src/formats/registry.js';
import { vmdkDriver } from '../src/formats/vmdk/index.js';
import { SshHost } from '../src/headstart/host.js';
import {
  bootstrapScript, defineScript, domainUuid, domainXml, hypervisorFor, parseGetAllVms, powershellArgv, psQuote, testBootScript, vmxQuote, windowsPath,
  type StandbyVm, type VmSettings,
} from '../src/headstart/vm/index.js';
import { LIBVIRT_URI, removeDomains, startLibvirt } from './helpers/libvirt.js';
import { startSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const MARKER = 'IMAGEKEEP-BOOT-OK';

// libvirt's QEMU runs as libvirt-qemu: every folder above a disk must be searchable by it.
const work = await mkdtemp(join(tmpdir(), 'imagekeep-vm-'));
await chmod(work, 0o755);
const bin = join(work, 'bin');
const esxState = join(work, 'esx-state');
const psState = join(work, 'ps-state');
const vmfsRoot = join(work, 'vmfs');
const home = join(work, 'home');
for (const d of [bin, esxState, psState, vmfsRoot, home]) await mkdir(d, { recursive: true });
await writeStandIns();

const sshd = await startSshd({
  setEnv: {
    PATH: `${bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
    // An empty home: no ~/.bashrc to slow every command down or put its PATH first.
    HOME: home,
    VIMCMD_STATE: esxState,
    VIMCMD_ROOT: vmfsRoot,
    PS_STATE: psState,
  },
});
const libvirt = await startLibvirt();
const host = await SshHost.connect(sshd.connectOptions());
const prefix = `ik-vm-${process.pid}-`;
t.teardown(async () => {
  await removeDomains(prefix);
  await host.close();
  await sshd.stop();
  await libvirt.stop();
  await rm(work, { recursive: true, force: true });
});

const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');
const virsh = async (...args: string[]): Promise<string> => (await run('virsh', ['-c', LIBVIRT_URI, ...args])).stdout;

/** A raw disk of `size` bytes holding the marker boot sector in its first 512 bytes. */
async function bootDisk(path: string, size = 4 * MiB, marker = `${MARKER}\r\n`): Promise<void> {
  const disk = Buffer.alloc(size);
  bootSector(marker).copy(disk, 0);
  await writeFile(path, disk);
}

async function waitForText(path: string, text: string, ms: number): Promise<string> {
  const deadline = Date.now() + ms;
  let seen = '';
  while (Date.now() < deadline) {
    seen = existsSync(path) ? readFileSync(path, 'latin1') : '';
    if (seen.includes(text)) return seen;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`"${text}" did not appear in ${path} within ${ms} ms; it holds ${JSON.stringify(seen)}`);
}

t.test('boot sector: 512 bytes, code then marker before the partition table, 0x55AA', async (t) => {
  const s = bootSector('HELLO');
  t.equal(s.length, 512);
  t.equal(s.readUInt16BE(510), 0x55aa);
  t.equal(s[0], 0xfa, 'starts with cli');
  t.equal(s.subarray(0x1d, 0x1d + 5).toString(), 'HELLO', 'marker right after the 29 code bytes');
  t.equal(s.readUInt16LE(6), 0x7c00 + 0x1d, 'mov si points at the marker as loaded at 0x7C00');
  t.equal(s.readUInt16LE(9), 5, 'mov cx holds the marker length');
  t.ok(s.subarray(446, 510).every((b) => b === 0), 'partition table left empty');
  t.equal(bootSector('x'.repeat(MAX_BOOT_MARKER_BYTES)).subarray(446, 510).every((b) => b === 0), true, 'the longest marker ends before offset 446');
  t.throws(() => bootSector('x'.repeat(MAX_BOOT_MARKER_BYTES + 1)), /at most 417 fit/);
  t.throws(() => bootSector(''), /empty/);

  // The hand-assembled code, as binutils reads it back (16-bit, loaded at 0x7C00).
  const bin = join(work, 'sector.bin');
  await writeFile(bin, s);
  const { stdout } = await run('objdump', ['-D', '-b', 'binary', '-m', 'i8086', '--adjust-vma=0x7c00', '--stop-address=0x7c1d', bin]);
  const code = stdout.split('\n').filter((l) => /^\s+7c[0-9a-f]{2}:/.test(l)).map((l) => l.split('\t').pop()!.replace(/\s+/g, ' ').trim());
  t.same(code, [
    'cli', 'xor %ax,%ax', 'mov %ax,%ds', 'mov $0x7c1d,%si', 'mov $0x5,%cx', 'cld',
    'mov $0x3fd,%dx', 'in (%dx),%al', 'test $0x20,%al', 'je 0x7c0c', 'mov $0xf8,%dl',
    'lods %ds:(%si),%al', 'out %al,(%dx)', 'loop 0x7c0c', 'hlt', 'jmp 0x7c1a',
  ], 'objdump disassembles the commented instructions');
});

t.test('libvirt over SSH: raw and qcow2 disks defined, started, the marker read from the serial file', async (t) => {
  const dir = join(work, 'libvirt');
  await mkdir(dir);
  await chmod(dir, 0o755);
  const raw = join(dir, 'standby-raw.img');
  const qcow2 = join(dir, 'standby-qcow2.qcow2');
  await bootDisk(raw);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  const hv = hypervisorFor('libvirt');
  const vms: StandbyVm[] = [
    { settings: { name: `${prefix}raw`, cpus: 1, memoryMiB: 64, firmware: 'bios', serialLog: join(dir, 'raw.serial.log') }, diskPath: raw, diskFormat: 'raw' },
    { settings: { name: `${prefix}qcow2`, cpus: 1, memoryMiB: 64, firmware: 'bios', serialLog: join(dir, 'qcow2.serial.log') }, diskPath: qcow2, diskFormat: 'qcow2' },
  ];
  for (const vm of vms) {
    const defined = await hv.define(host, vm);
    t.equal(defined.definitionPath, vm.diskPath.replace(/\.[a-z0-9]+$/, '.xml'), 'domain XML beside the disk');
    t.equal(defined.id, domainUuid(vm.diskPath));
    t.equal((await hv.define(host, vm)).id, defined.id, 'defining again updates the same domain');
    const xml = await virsh('dumpxml', vm.settings.name);
    t.match(xml, `<source file='${vm.diskPath}'`);
    t.match(xml, `type='${vm.diskFormat}'`);
    t.match(xml, `<domain type='qemu'`);
    t.notOk(await hv.isRunning(host, vm));

    await hv.start(host, vm);
    t.ok(await hv.isRunning(host, vm));
    await hv.start(host, vm); // already running: left alone
    const serial = await waitForText(vm.settings.serialLog!, MARKER, 30_000);
    t.match(serial, MARKER, `${vm.diskFormat}: the boot sector printed its marker`);

    await t.rejects(hv.define(host, vm), { code: 'VM_RUNNING' }, 'no redefinition while it runs');
    await t.rejects(hv.testBoot(host, { ...vm, marker: MARKER, timeoutMs: 5000 }), { code: 'VM_RUNNING' }, 'no test boot while the VM runs on the disk');
    await hv.stop(host, vm);
    t.notOk(await hv.isRunning(host, vm));
  }

  const other = { ...vms[1]!, diskPath: join(dir, 'someone-else.qcow2') };
  await t.rejects(hv.define(host, other), { code: 'VM_NAME_TAKEN', message: /already exists and is not the standby of/ });

  // A name that needs escaping in XML, through the real libvirt parser.
  const odd = join(dir, 'odd.img');
  await bootDisk(odd, MiB);
  const oddName = `${prefix}odd '"<&> name`;
  const oddVm: StandbyVm = { settings: { name: oddName, cpus: 1, memoryMiB: 64, firmware: 'bios' }, diskPath: odd, diskFormat: 'raw' };
  await hv.define(host, oddVm);
  t.equal((await virsh('domname', domainUuid(odd))).trim(), oddName);
});

t.test('libvirt test boot: throwaway overlay, marker seen, the standby unchanged', async (t) => {
  const dir = join(work, 'libvirt');
  const hv = hypervisorFor('libvirt');
  for (const [format, file] of [['qcow2', 'standby-qcow2.qcow2'], ['raw', 'standby-raw.img']] as const) {
    const diskPath = join(dir, file);
    const vm: StandbyVm = { settings: { name: `${prefix}${format}`, cpus: 1, memoryMiB: 64, firmware: 'bios', network: 'default' }, diskPath, diskFormat: format };
    const before = sha256(diskPath);
    const steps: string[] = [];
    const r = await hv.testBoot(host, { ...vm, marker: MARKER, timeoutMs: 30_000, onProgress: (m) => steps.push(m) });
    t.ok(r.ok, r.detail);
    t.equal(r.how, 'marker');
    t.match(r.detail, /appeared on the serial console after/);
    t.match(r.console, MARKER);
    t.ok(steps.some((s) => s.includes('.testboot.qcow2')), 'the overlay was announced');
    t.equal(sha256(diskPath), before, `${format}: the standby disk is byte-for-byte unchanged`);
    t.same(readdirSync(dir).filter((f) => f.includes('.testboot.')), [], 'overlay, serial file and XML removed');
    t.notMatch(await virsh('list', '--all', '--name'), `${prefix}${format}-testboot`, 'the transient domain is gone');
  }

  // No marker: it must keep running; the screen is saved.
  const qcow2 = join(dir, 'standby-qcow2.qcow2');
  const before = sha256(qcow2);
  const ran = await hv.testBoot(host, { settings: { name: `${prefix}qcow2`, cpus: 1, memoryMiB: 64, firmware: 'bios' }, diskPath: qcow2, diskFormat: 'qcow2', timeoutMs: 20_000, runMs: 1000 });
  t.ok(ran.ok, ran.detail);
  t.equal(ran.how, 'ran');
  t.equal(ran.screenshotPath, join(dir, 'standby-qcow2.testboot.png'));
  t.equal(readFileSync(ran.screenshotPath!).subarray(1, 4).toString(), 'PNG', 'a PNG of the screen');
  t.equal(sha256(qcow2), before);

  // A disk that does not boot: the marker never comes, the result says so.
  const blank = join(dir, 'blank.img');
  await writeFile(blank, Buffer.alloc(MiB));
  const failed = await hv.testBoot(host, { settings: { name: `${prefix}blank`, cpus: 1, memoryMiB: 64, firmware: 'bios' }, diskPath: blank, diskFormat: 'raw', marker: MARKER, timeoutMs: 3000 });
  t.notOk(failed.ok);
  t.match(failed.detail, /"IMAGEKEEP-BOOT-OK" did not appear on the serial console within 3\.0 s/);
  t.notMatch(await virsh('list', '--all', '--name'), `${prefix}blank-testboot`);
  t.ok(readFileSync(blank).every((b) => b === 0), 'the blank disk stays blank');
});

t.test('libvirt domain XML', async (t) => {
  const settings: VmSettings = { name: 'a<b>&"c\'', cpus: 2, memoryMiB: 2048, firmware: 'uefi', network: 'lan & dmz' };
  const xml = domainXml({ settings, diskPath: '/d/x&y.qcow2', diskFormat: 'qcow2', domainType: 'kvm', uuid: domainUuid('/d/x&y.qcow2') });
  t.match(xml, '<name>a&lt;b&gt;&amp;&quot;c&apos;</name>');
  t.match(xml, `<domain type='kvm'>`);
  t.match(xml, `<os firmware='efi'>`);
  t.match(xml, `<feature enabled='no' name='secure-boot'/>`);
  t.match(xml, `<source file='/d/x&amp;y.qcow2'/>`);
  t.match(xml, `<source network='lan &amp; dmz'/>`);
  t.match(xml, `<memory unit='MiB'>2048</memory>`);
  t.match(xml, '<vcpu>2</vcpu>');
  t.notMatch(xml, '<serial', 'no serial port without serialLog');
  const bios = domainXml({ settings: { name: 'b', cpus: 1, memoryMiB: 64, firmware: 'bios' }, diskPath: '/d/b.img', diskFormat: 'raw', domainType: 'qemu' });
  t.notMatch(bios, 'efi');
  t.notMatch(bios, '<interface', 'no NIC without a network');
  t.notMatch(bios, '<uuid>');
  t.match(domainUuid('/d/b.img'), /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
});

/** What a stand-in was asked: one argv per line, words separated by 0x1F. */
function calls(file: string): string[][] {
  const text = existsSync(file) ? readFileSync(file, 'utf8') : '';
  return text.split('\n').filter((l) => l !== '').map((l) => l.split('\x1f').slice(0, -1));
}

function vmxEntries(text: string): Map<string, string> {
  return new Map(text.trim().split('\n').map((l) => {
    const m = /^(\S+) = "(.*)"$/.exec(l);
    if (!m) throw new Error(`not a VMX line: ${l}`);
    return [m[1]!, m[2]!];
  }));
}

t.test('ESXi through a stand-in vim-cmd: VMX beside the descriptor, registration, power, test boot', async (t) => {
  const folder = join(vmfsRoot, 'datastore1', 'web server');
  await mkdir(folder, { recursive: true });
  const descriptor = join(folder, 'web.vmdk');
  // qemu-img cannot make the vmfs layout; our VMDK writer (checked against qemu-img in formats-vmdk) can.
  const writer = await vmdkDriver.create!(await LocalFile.open(descriptor, 'w'), localOpener(folder), { size: 16 * MiB, subformat: 'vmfs', finalName: 'web.vmdk' });
  await writer.close();
  t.ok(existsSync(join(folder, 'web-flat.vmdk')), 'descriptor + flat extent');
  const hv = hypervisorFor('esx', { esx: { datastoreRoot: vmfsRoot } });
  const vm: StandbyVm = {
    settings: { name: 'web "01" | prod', cpus: 2, memoryMiB: 4096, firmware: 'uefi', network: 'VM Network' },
    diskPath: descriptor, diskFormat: 'vmdk', diskSubformat: 'vmfs',
  };
  const log = join(esxState, 'calls.log');
  const vmxPath = join(folder, 'web.vmx');

  const defined = await hv.define(host, vm);
  t.same(defined, { definitionPath: vmxPath, id: '1' });
  t.same(calls(log), [['vmsvc/getallvms'], ['solo/registervm', vmxPath, 'web "01" | prod']]);
  const vmx = vmxEntries(await readFile(vmxPath, 'utf8'));
  t.equal(vmx.get('displayName'), 'web |2201|22 |7C prod', 'quotes and bars escaped the VMX way');
  t.equal(vmx.get('numvcpus'), '2');
  t.equal(vmx.get('memSize'), '4096');
  t.equal(vmx.get('firmware'), 'efi');
  t.equal(vmx.get('uefi.secureBoot.enabled'), 'FALSE');
  t.equal(vmx.get('scsi0.virtualDev'), 'lsisas1068');
  t.equal(vmx.get('scsi0:0.fileName'), 'web.vmdk');
  t.equal(vmx.get('ethernet0.networkName'), 'VM Network');
  t.equal(vmx.get('ethernet0.virtualDev'), 'e1000e');
  t.ok(vmx.has('virtualHW.version') && vmx.has('config.version') && vmx.has('guestOS'));
  t.notOk(vmx.has('scsi0:0.mode'), 'the standby disk is persistent');

  await writeFile(log, '');
  t.equal((await hv.define(host, vm)).id, '1', 'found again by its VMX path in getallvms');
  t.same(calls(log), [['vmsvc/getallvms'], ['vmsvc/power.getstate', '1'], ['vmsvc/reload', '1']], 'redefining reloads, never registers twice');

  await hv.start(host, vm);
  t.ok(await hv.isRunning(host, vm));
  t.ok(calls(log).some((c) => c.join(' ') === 'vmsvc/power.on 1'));
  await t.rejects(hv.define(host, vm), { code: 'VM_RUNNING' });
  await t.rejects(hv.testBoot(host, { ...vm, marker: 'X', timeoutMs: 5000 }), { code: 'VM_RUNNING' });
  await hv.stop(host, vm);
  t.notOk(await hv.isRunning(host, vm));

  // Test boot: the stand-in "guest" writes the console text into the VMX's serial file at power-on.
  await writeFile(join(esxState, 'console'), `booting\n${MARKER}\n`);
  await writeFile(log, '');
  const before = sha256(join(folder, 'web-flat.vmdk'));
  const r = await hv.testBoot(host, { ...vm, marker: MARKER, timeoutMs: 10_000 });
  t.ok(r.ok, r.detail);
  t.equal(r.how, 'marker');
  const testVmx = join(folder, 'web.testboot.vmx');
  const asked = calls(log).map((c) => c.join(' '));
  t.ok(asked.includes(`solo/registervm ${testVmx} web "01" | prod-testboot`), 'a throwaway VM registered');
  t.ok(asked.includes('vmsvc/power.on 2') && asked.includes('vmsvc/power.off 2') && asked.includes('vmsvc/unregister 2'), 'powered on, off, unregistered');
  const throwaway = vmxEntries(readFileSync(join(esxState, 'registered-2.vmx'), 'utf8'));
  t.equal(throwaway.get('scsi0:0.fileName'), 'web.vmdk');
  t.equal(throwaway.get('scsi0:0.mode'), 'independent-nonpersistent', 'writes go to a redo log ESXi discards');
  t.equal(throwaway.get('serial0.fileName'), 'web.testboot.serial.log');
  t.equal(throwaway.get('msg.autoAnswer'), 'TRUE');
  t.notOk(throwaway.has('ethernet0.present'), 'no network on a test boot');
  t.same(readdirSync(folder).filter((f) => f.includes('testboot')), [], 'VMX and serial file removed');
  t.equal(sha256(join(folder, 'web-flat.vmdk')), before);
  t.same(readFileSync(join(esxState, 'vms'), 'utf8').trim().split('\n').map((l) => l.split('\t')[0]), ['1'], 'only the standby stays registered');

  // A hosted sparse VMDK does not power on on ESXi: the descriptor itself is checked.
  const sparse = join(folder, 'sparse.vmdk');
  await run('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicSparse', sparse, '16M']);
  await t.rejects(hv.define(host, { ...vm, diskPath: sparse, diskSubformat: undefined }), { code: 'USAGE', message: /not a VMDK text descriptor; ESXi powers on only its native vmfs layout/ });
  const flat = join(folder, 'flat.vmdk');
  await run('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', flat, '16M']);
  await t.rejects(hv.define(host, { ...vm, diskPath: flat }), { code: 'USAGE', message: /is a monolithicFlat VMDK/ });
});

t.test('ESXi getallvms parsing and VMX quoting', async (t) => {
  const out = [
    'Vmid         Name                      File                          Guest OS       Version   Annotation',
    '12     web 01             [datastore 1] web server/web.vmx   otherGuest64   vmx-14              ',
    'Skipping invalid VM \'7\'',
    '3      db                 [ds2] db/db.vmx                     windows9Server64Guest   vmx-19    backup copy',
  ].join('\n');
  t.same(parseGetAllVms(out), [
    { vmid: '12', name: 'web 01', datastore: 'datastore 1', relativePath: 'web server/web.vmx' },
    { vmid: '3', name: 'db', datastore: 'ds2', relativePath: 'db/db.vmx' },
  ]);
  t.equal(vmxQuote('a"b|c#d\ne'), '"a|22b|7Cc|23d|0Ae"');
});

t.test('Hyper-V through a stand-in powershell: scripts for New-VM, generation from firmware, test boot on a differencing disk', async (t) => {
  const dir = join(work, 'hyperv');
  await mkdir(dir);
  const vhdx = join(dir, 'web.vhdx');
  await run('qemu-img', ['create', '-q', '-f', 'vhdx', vhdx, '16M']);
  const hv = hypervisorFor('hyperv');
  const vm: StandbyVm = { settings: { name: "O'Brien ‘web’", cpus: 4, memoryMiB: 2048, firmware: 'uefi', network: 'External' }, diskPath: vhdx, diskFormat: 'vhdx' };
  const argvLog = join(psState, 'calls.log');

  const defined = await hv.define(host, vm);
  t.same(defined, { definitionPath: join(dir, 'web.ps1'), id: '8e0c9f3a-0000-4000-8000-000000000001' });
  const asked = calls(argvLog);
  t.equal(asked.length, 2, 'state, then define');
  for (const argv of asked) t.same(argv.slice(0, 3), ['-NoProfile', '-NonInteractive', '-EncodedCommand']);
  const scripts = readFileSync(join(psState, 'scripts.log'), 'utf8').split('\x1e\n');
  t.match(scripts[0], /^# imagekeep hyperv state\n/);
  const define = scripts[1]!;
  t.match(define, /^# imagekeep hyperv define\n/);
  t.match(define, `$name = 'O''Brien ‘‘web’’'`, 'single and typographic quotes doubled');
  t.match(define, `$vhd = '${vhdx}'`);
  t.match(define, '-Generation 2 -MemoryStartupBytes 2147483648 -VHDPath $vhd');
  t.match(define, "-SwitchName 'External'");
  t.match(define, 'Set-VMProcessor -VM $vm -Count 4');
  t.match(define, 'Set-VMFirmware -VM $vm -EnableSecureBoot Off');
  t.notMatch(define, 'Remove-VMNetworkAdapter');
  const file = readFileSync(defined.definitionPath, 'utf8');
  t.ok(file.startsWith('\ufeff# imagekeep hyperv define\r\n'), 'the kept script has a BOM and CRLF lines');
  t.match(file, 'Set-VMProcessor -VM $vm -Count 4');

  await hv.start(host, vm);
  t.ok(await hv.isRunning(host, vm));
  await t.rejects(hv.define(host, vm), { code: 'VM_RUNNING' });
  await t.rejects(hv.testBoot(host, { ...vm, marker: 'X', timeoutMs: 5000 }), { code: 'VM_RUNNING' });
  await hv.stop(host, vm);
  t.notOk(await hv.isRunning(host, vm));
  await t.rejects(hv.define(host, { ...vm, diskPath: join(dir, 'other.vhdx') }), { code: 'VM_NAME_TAKEN' });

  await writeFile(join(psState, 'console'), MARKER);
  await writeFile(join(psState, 'scripts.log'), '');
  const r = await hv.testBoot(host, { ...vm, marker: MARKER, timeoutMs: 60_000 });
  t.ok(r.ok, r.detail);
  t.equal(r.how, 'marker');
  t.match(r.detail, /appeared on COM1 after 4\.2 s/);
  const boot = readFileSync(join(psState, 'scripts.log'), 'utf8').split('\x1e\n').find((s) => s.startsWith('# imagekeep hyperv testboot'))!;
  t.match(boot, `$parent = '${vhdx}'`);
  t.match(boot, `$child = '${join(dir, 'web.testboot.vhdx')}'`);
  t.match(boot, 'New-VHD -Path $child -ParentPath $parent -Differencing');
  t.match(boot, '-Generation 2 -MemoryStartupBytes 2147483648 -VHDPath $child');
  t.notMatch(boot, '-SwitchName', 'no network on a test boot');
  t.match(boot, 'Remove-VMNetworkAdapter');
  t.match(boot, `$marker = '${MARKER}'`);
  t.match(boot, 'Set-VMComPort -VM $vm -Number 1');
  t.match(boot, /finally \{\n.*Stop-VM -VM \$vm -TurnOff -Force.*Remove-VM -VM \$vm -Force \}\nRemove-Item -LiteralPath \$child/s, 'the throwaway VM and disk are removed in a finally');
  t.match(boot, '$timeoutMs = 60000');

  // A script too long for cmd.exe is written beside the disk, run by a short one, then removed.
  const longMarker = 'M'.repeat(3000);
  await writeFile(join(psState, 'console'), longMarker);
  await writeFile(join(psState, 'scripts.log'), '');
  const spilled = await hv.testBoot(host, { ...vm, marker: longMarker, timeoutMs: 60_000 });
  t.ok(spilled.ok, 'the long script ran');
  const ran = readFileSync(join(psState, 'scripts.log'), 'utf8').split('\x1e\n');
  t.match(ran[ran.length - 3], `ReadAllText('${join(dir, 'web.testboot.ps1')}')`, 'through the file beside the disk');
  t.match(ran[ran.length - 2], `$marker = '${longMarker}'`);
  t.notOk(existsSync(join(dir, 'web.testboot.ps1')), 'the script file is removed');

  // BIOS on VHD: Generation 1, no firmware settings, no NIC without a switch.
  const gen1 = defineScript({ name: 'old', cpus: 1, memoryMiB: 512, firmware: 'bios' }, 'D:\\VMs\\old.vhd');
  t.match(gen1, '-Generation 1 -MemoryStartupBytes 536870912 -VHDPath $vhd');
  t.notMatch(gen1, 'Set-VMFirmware');
  t.match(gen1, 'Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter');
});

t.test('Hyper-V paths, quoting and command length', async (t) => {
  t.equal(windowsPath('/C:/VMs/web server/web.vhdx'), 'C:\\VMs\\web server\\web.vhdx');
  t.equal(windowsPath('/d:'), 'D:\\');
  t.equal(windowsPath('E:/x/y.vhdx'), 'E:\\x\\y.vhdx');
  t.equal(windowsPath('/srv/x.vhdx'), '/srv/x.vhdx');
  t.equal(psQuote("it's ‚x‛"), "'it''s ‚‚x‛‛'");
  const script = defineScript({ name: 'w', cpus: 2, memoryMiB: 1024, firmware: 'uefi' }, windowsPath('/C:/VMs/w.vhdx'));
  t.match(script, "$vhd = 'C:\\VMs\\w.vhdx'");
  const input = {
    settings: { name: 'web', cpus: 2, memoryMiB: 4096, firmware: 'uefi' as const },
    parentPath: 'C:\\VMs\\web.vhdx', childPath: 'C:\\VMs\\web.testboot.vhdx',
    marker: MARKER, timeoutMs: 600_000, runMs: 10_000, pipeName: 'imagekeep-testboot-0123456789ab',
  };
  const argv = powershellArgv(testBootScript(input));
  t.ok(argv, 'a test boot with short paths goes on the command line');
  t.ok(argv!.join(' ').length <= 8191, `within cmd.exe's 8191 characters (${argv!.join(' ').length})`);
  const decoded = Buffer.from(argv![4]!, 'base64').toString('utf16le');
  t.notMatch(decoded, /^\s+/m, 'indentation dropped');
  t.notMatch(decoded.split('\n').slice(1).join('\n'), /^#/m, 'comments dropped');
  t.match(decoded, 'New-VHD -Path $child -ParentPath $parent -Differencing');
  const long = { ...input, parentPath: `C:\\${'p'.repeat(400)}\\web.vhdx`, childPath: `C:\\${'p'.repeat(400)}\\web.testboot.vhdx` };
  t.equal(powershellArgv(testBootScript(long)), null, 'long paths do not fit: the script goes to a file');
  t.match(bootstrapScript('C:\\VMs\\it\'s.ps1'), "ReadAllText('C:\\VMs\\it''s.ps1')");
});

t.test('disks and settings a hypervisor cannot take are refused with what to choose', async (t) => {
  const refuses = (fn: () => void, message: RegExp, what: string): void => {
    try {
      fn();
      t.fail(`${what}: not refused`);
    } catch (e) {
      t.ok(e instanceof UsageError && message.test(e.message), `${what}: ${(e as Error).message}`);
    }
  };
  const libvirt = hypervisorFor('libvirt');
  const esx = hypervisorFor('esx');
  const hyperv = hypervisorFor('hyperv');
  refuses(() => libvirt.checkDisk('vhdx'), /libvirt standby disks are qcow2 or raw, not vhdx; choose --format qcow2/, 'libvirt: VHDX');
  libvirt.checkDisk('qcow2');
  libvirt.checkDisk('raw');
  refuses(() => esx.checkDisk('vmdk', 'monolithicSparse'), /only its native vmfs VMDK layout .* not monolithicSparse; choose --subformat vmfs/, 'ESXi: hosted sparse VMDK');
  refuses(() => esx.checkDisk('vmdk'), /not the default hosted sparse VMDK; choose --subformat vmfs/, 'ESXi: no subformat');
  refuses(() => esx.checkDisk('qcow2'), /VMDK in its native vmfs layout, not qcow2/, 'ESXi: qcow2');
  esx.checkDisk('vmdk', 'vmfs');
  refuses(() => hyperv.checkDisk('vhd', 'dynamic', { firmware: 'uefi' }), /Generation 2, which takes VHDX only; choose --format vhdx, or BIOS firmware/, 'Hyper-V: VHD with UEFI');
  refuses(() => hyperv.checkDisk('qcow2', undefined, { firmware: 'bios' }), /VHDX \(or VHD for a Generation 1, BIOS VM\), not qcow2/, 'Hyper-V: qcow2');
  hyperv.checkDisk('vhd', 'fixed', { firmware: 'bios' });
  hyperv.checkDisk('vhdx', 'dynamic', { firmware: 'uefi' });
  hypervisorFor('none').checkDisk('qcow2');

  const ok: VmSettings = { name: 'web', cpus: 2, memoryMiB: 2048, firmware: 'bios' };
  refuses(() => esx.checkSettings({ ...ok, memoryMiB: 1001 }), /ESXi: memory must be a multiple of 4 MiB, not 1001/, 'ESXi memory unit');
  refuses(() => hyperv.checkSettings({ ...ok, memoryMiB: 33 }), /Hyper-V: memory must be an even number of MiB/, 'Hyper-V memory unit');
  refuses(() => libvirt.checkSettings({ ...ok, name: 'a/b' }), /slash/, 'a slash in the name');
  refuses(() => libvirt.checkSettings({ ...ok, cpus: 0 }), /cpus must be an integer from 1 to 256, not 0/, 'no CPUs');
  refuses(() => libvirt.checkSettings({ ...ok, serialLog: 'rel.log' }), /serialLog must be an absolute path/, 'relative serial log');
  await t.rejects(libvirt.testBoot(host, { settings: ok, diskPath: '/x.qcow2', diskFormat: 'qcow2', timeoutMs: 0 }), /positive timeout/);
  await t.rejects(hypervisorFor('none').testBoot(host, { settings: ok, diskPath: '/x', diskFormat: 'raw', timeoutMs: 1 }), /needs a hypervisor/);
  t.throws(() => hypervisorFor('vbox' as never), /unknown hypervisor "vbox"/);
});

/** The stand-ins: ESXi's vim-cmd and Windows PowerShell, shell scripts that log what they were asked. */
async function writeStandIns(): Promise<void> {
  // Bash's ${...} would be a template placeholder here: the scripts write it @{...}.
  const bash = (text: string): string => text.replace(/@\{/g, '$' + '{');
  const vimCmd = bash(String.raw`#!/bin/bash
# Stand-in for ESXi's vim-cmd: logs its argv (words separated by 0x1F) and keeps registrations
# and power states in $VIMCMD_STATE. Datastores are the folders of $VIMCMD_ROOT.
set -u
st="$VIMCMD_STATE"
for a in "$@"; do printf '%s\x1f' "$a"; done >> "$st/calls.log"; echo >> "$st/calls.log"
touch "$st/vms"
vmx_of() { awk -F'\t' -v id="$1" '$1 == id { print $3 }' "$st/vms"; }
need() { [ -n "$(vmx_of "$1")" ] || { echo "vim.fault.NotFound: no VM $1" >&2; exit 1; }; }
case "$1" in
  vmsvc/getallvms)
    { printf 'Vmid   Name   File   Guest OS   Version   Annotation\n'
      while IFS=$'\t' read -r id name path; do
        rel="@{path#"$VIMCMD_ROOT"/}"; ds="@{rel%%/*}"; rest="@{rel#*/}"
        printf '%-6s %-20s [%s] %s   otherGuest64   vmx-14   \n' "$id" "$name" "$ds" "$rest"
      done < "$st/vms"; } ;;
  solo/registervm)
    [ -f "$2" ] || { echo "vim.fault.NotFound: $2" >&2; exit 1; }
    id=$(( $(cat "$st/next" 2>/dev/null || echo 1) )); echo $((id + 1)) > "$st/next"
    printf '%s\t%s\t%s\n' "$id" "$3" "$2" >> "$st/vms"; cp "$2" "$st/registered-$id.vmx"; echo "$id" ;;
  vmsvc/reload) need "$2" ;;
  vmsvc/power.getstate)
    need "$2"; echo 'Retrieved runtime info'; if [ -f "$st/on-$2" ]; then echo 'Powered on'; else echo 'Powered off'; fi ;;
  vmsvc/power.on)
    need "$2"; vmx=$(vmx_of "$2"); touch "$st/on-$2"
    serial=$(sed -n 's/^serial0\.fileName = "\(.*\)"$/\1/p' "$vmx")
    if [ -n "$serial" ] && [ -f "$st/console" ]; then
      case "$serial" in /*) ;; *) serial="$(dirname "$vmx")/$serial" ;; esac
      cp "$st/console" "$serial"
    fi ;;
  vmsvc/power.off) need "$2"; rm -f "$st/on-$2" ;;
  vmsvc/unregister) need "$2"; awk -F'\t' -v id="$2" '$1 != id' "$st/vms" > "$st/vms.new"; mv "$st/vms.new" "$st/vms" ;;
  *) echo "Unknown command: '$1'" >&2; exit 1 ;;
esac
`);
  const powershell = bash(String.raw`#!/bin/bash
# Stand-in for Windows PowerShell: logs its argv and the decoded -EncodedCommand script, and
# answers each imagekeep script (named on its first line) from the state in $PS_STATE.
set -u
st="$PS_STATE"
for a in "$@"; do printf '%s\x1f' "$a"; done >> "$st/calls.log"; echo >> "$st/calls.log"
[ "$3" = -EncodedCommand ] || { echo "expected -EncodedCommand, got $3" >&2; exit 1; }
script=$(printf '%s' "$4" | base64 -d | iconv -f UTF-16LE -t UTF-8)
printf '%s\x1e\n' "$script" >> "$st/scripts.log"
action=$(printf '%s\n' "$script" | head -1 | sed -n 's/^# imagekeep hyperv //p')
if [ "$action" = file ]; then
  path=$(printf '%s\n' "$script" | sed -n "s/.*ReadAllText('\(.*\)').*/\1/p")
  script=$(sed '1s/^\xEF\xBB\xBF//' "$path" | tr -d '\r')
  printf '%s\x1e\n' "$script" >> "$st/scripts.log"
  action=$(printf '%s\n' "$script" | head -1 | sed -n 's/^# imagekeep hyperv //p')
fi
state=$(cat "$st/state" 2>/dev/null || echo none)
disk=$(cat "$st/disk" 2>/dev/null || echo)
case "$action" in
  state)
    if [ "$state" = none ]; then echo 'IMAGEKEEP-RESULT {"exists":false}'
    else printf 'IMAGEKEEP-RESULT {"exists":true,"state":"%s","id":"8e0c9f3a-0000-4000-8000-000000000001","disks":["%s"]}\n' "$state" "$disk"; fi ;;
  define)
    printf '%s\n' "$script" | sed -n "s/^\\\$vhd = '\(.*\)'\$/\1/p" > "$st/disk"; echo Off > "$st/state"
    gen=$(printf '%s\n' "$script" | sed -n 's/.*-Generation \([12]\).*/\1/p')
    printf 'IMAGEKEEP-RESULT {"id":"8e0c9f3a-0000-4000-8000-000000000001","generation":%s}\n' "$gen" ;;
  start) echo Running > "$st/state"; echo 'IMAGEKEEP-RESULT {"state":"Running"}' ;;
  stop) [ "$state" = none ] || echo Off > "$st/state"; echo 'IMAGEKEEP-RESULT {}' ;;
  testboot) printf 'IMAGEKEEP-RESULT {"ok":true,"how":"marker","console":"%s","stopped":null,"elapsedMs":4200}\n' "$(cat "$st/console")" ;;
  *) echo "The term '$action' is not recognized" >&2; exit 1 ;;
esac
`);
  await writeFile(join(bin, 'vim-cmd'), vimCmd, { mode: 0o755 });
  await writeFile(join(bin, 'powershell'), powershell, { mode: 0o755 });
}
