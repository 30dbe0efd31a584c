/*
 * A setuid-root program in the "hostile" test image. An action runs it to try to gain
 * root: it prints the ids it ended up with and then tries to append to the file it is
 * given (an input file hard-linked from the CAS, say).
 *   suid-probe PATH
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    printf("euid=%d ruid=%d\n", (int)geteuid(), (int)getuid());
    if (argc < 2) return 0;
    int fd = open(argv[1], O_WRONLY | O_APPEND);
    if (fd < 0) {
        printf("append: %s\n", strerror(errno));
        return 0;
    }
    ssize_t written = write(fd, "poisoned\n", 9);
    printf("append: wrote %zd\n", written);
    close(fd);
    return 0;
}
