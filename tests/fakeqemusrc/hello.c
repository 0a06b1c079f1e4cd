#include <stdio.h>

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    printf("QEMU emulator version 10.2.99 (fake)\n");
    return 0;
}
