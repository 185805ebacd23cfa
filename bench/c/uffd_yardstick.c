/* Yardstick for the synchronous uffd fault rate: what the kernel and this machine allow a handler
 * that does nothing but read WP fault messages and unprotect each page (no recording). Built and
 * run by bench/b_wp.py when a C compiler is present; hintpipe ships no compiled code.
 *
 *   uffd_yardstick FD:ADDR ...   serve these uffds until stdin closes
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
  int n = argc - 1;
  struct pollfd p[17];
  uint64_t addr[16];
  if (n < 1 || n > 16) return 2;
  for (int i = 0; i < n; i++) {
    if (sscanf(argv[1 + i], "%d:%lu", &p[i].fd, &addr[i]) != 2) return 2;
    p[i].events = POLLIN;
  }
  p[n].fd = 0;
  p[n].events = POLLIN;
  struct uffd_msg msgs[256];
  for (;;) {
    if (poll(p, n + 1, -1) < 0) continue;
    if (p[n].revents) return 0;
    for (int i = 0; i < n; i++) {
      if (!p[i].revents) continue;
      ssize_t r = read(p[i].fd, msgs, sizeof msgs);
      for (int k = 0; k < r / (ssize_t)sizeof(struct uffd_msg); k++) {
        struct uffdio_writeprotect wp = {.range = {msgs[k].arg.pagefault.address & ~4095UL, 4096}, .mode = 0};
        while (ioctl(p[i].fd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno == EAGAIN);
      }
    }
  }
}
