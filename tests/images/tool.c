/*
 * The only file of the "no shell" test image: a static program standing in for a
 * compiler in an image that has no /bin/sh, no libc, nothing else.
 *   tool write PATH TEXT...   writes TEXT to PATH (and says so on stdout)
 *   tool env NAME             prints the value of NAME
 *   tool fail CODE            exits with CODE
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "write") == 0) {
        FILE *out = fopen(argv[2], "w");
        if (!out) {
            perror(argv[2]);
            return 1;
        }
        for (int i = 3; i < argc; i++) fprintf(out, "%s%s", argv[i], i + 1 < argc ? " " : "\n");
        fclose(out);
        printf("wrote %s\n", argv[2]);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "env") == 0) {
        const char *value = getenv(argv[2]);
        printf("%s\n", value ? value : "(unset)");
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "fail") == 0) return atoi(argv[2]);
    fprintf(stderr, "usage: tool write PATH TEXT... | env NAME | fail CODE\n");
    return 2;
}
