/**
 * A 512-byte MBR boot sector that proves a disk booted: it writes a marker to the first
 * serial port (COM1, I/O port 0x3F8) and halts. A hypervisor that sends COM1 to a file
 * (libvirt `<serial type='file'>`, an ESXi serial port to a file, a Hyper-V COM port pipe)
 * then holds the marker within seconds of power-on, even under software emulation.
 *
 * The machine code is 16-bit real mode, assembled by hand below, one instruction per line.
 * The BIOS loads the sector at 0000:7C00 (some BIOSes jump with CS=07C0, IP=0): only relative
 * jumps are used, and the marker is addressed through DS=0 at 0x7C00 + its offset, so both
 * work. Each byte waits for the UART's transmit holding register to be empty (line status
 * bit 5) before it is written, as real 16550s need; QEMU's is always ready.
 *
 * Layout: code at 0..28, the marker right after it, zeros up to 446 (the four partition
 * entries at 446..509 stay free for a table), then the 0x55 0xAA signature at 510.
 */

const LOAD_ADDRESS = 0x7c00;
const SECTOR_BYTES = 512;
const PARTITION_TABLE_OFFSET = 446;
const SIGNATURE_OFFSET = 510;

/** The code before the marker; its length is where the marker starts. */
const CODE_BYTES = 0x1d;

/** The longest marker that still ends before the partition table. */
export const MAX_BOOT_MARKER_BYTES = PARTITION_TABLE_OFFSET - CODE_BYTES;

export function bootSector(marker: string): Buffer {
  const text = Buffer.from(marker, 'utf8');
  if (text.length === 0) throw new RangeError('the boot marker is empty; give at least one byte to print');
  if (text.length > MAX_BOOT_MARKER_BYTES) {
    throw new RangeError(`the boot marker is ${text.length} bytes; at most ${MAX_BOOT_MARKER_BYTES} fit between the code and the partition table at offset ${PARTITION_TABLE_OFFSET}`);
  }
  const markerAddress = LOAD_ADDRESS + CODE_BYTES;
  const lo = (n: number): number => n & 0xff;
  const hi = (n: number): number => (n >> 8) & 0xff;

  const code = [
    0xfa, //                                  0x00  cli                  no interrupts: nothing may wake the final hlt
    0x31, 0xc0, //                            0x01  xor ax, ax
    0x8e, 0xd8, //                            0x03  mov ds, ax           DS = 0, so DS:SI is the linear address
    0xbe, lo(markerAddress), hi(markerAddress), // 0x05  mov si, 0x7C00+0x1D  the marker
    0xb9, lo(text.length), hi(text.length), //  0x08  mov cx, length       bytes to send (at least 1: loop with CX=0 would run 65536 times)
    0xfc, //                                  0x0B  cld                  lodsb counts SI upwards
    0xba, 0xfd, 0x03, //                      0x0C  wait: mov dx, 0x3FD  COM1 line status register
    0xec, //                                  0x0F  in al, dx
    0xa8, 0x20, //                            0x10  test al, 0x20        transmit holding register empty?
    0x74, 0xf8, //                            0x12  jz wait              0x14 - 8 = 0x0C
    0xb2, 0xf8, //                            0x14  mov dl, 0xF8         DX = 0x3F8, COM1 data register
    0xac, //                                  0x16  lodsb                AL = [DS:SI], SI += 1
    0xee, //                                  0x17  out dx, al           send one byte
    0xe2, 0xf2, //                            0x18  loop wait            CX -= 1, back to 0x1A - 14 = 0x0C while CX != 0
    0xf4, //                                  0x1A  halt: hlt
    0xeb, 0xfd, //                            0x1B  jmp halt             0x1D - 3 = 0x1A: after an NMI, halt again
  ];
  if (code.length !== CODE_BYTES) throw new Error(`boot sector code is ${code.length} bytes, expected ${CODE_BYTES}`);

  const sector = Buffer.alloc(SECTOR_BYTES);
  Buffer.from(code).copy(sector, 0);
  text.copy(sector, CODE_BYTES);
  sector[SIGNATURE_OFFSET] = 0x55;
  sector[SIGNATURE_OFFSET + 1] = 0xaa;
  return sector;
}
